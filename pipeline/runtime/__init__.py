"""What a rank process has around it, whoever started it: rank environment, driver channel, heartbeats and watchdog, progress, threads."""
