"""spark-submit entry point: ``spark-submit jobs/etl.py --config c.yaml [--set k=v] [--force]``."""

from jobs.cli import submit

if __name__ == "__main__":
    submit("etl")
