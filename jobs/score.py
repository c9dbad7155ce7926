"""spark-submit entry point: ``spark-submit jobs/score.py --model B --input IN --output OUT``."""

from jobs.cli import submit

if __name__ == "__main__":
    submit("score")
