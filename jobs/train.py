"""spark-submit entry point: ``spark-submit jobs/train.py --config c.yaml [--set k=v] ...``."""

from jobs.cli import submit

if __name__ == "__main__":
    submit("train")
