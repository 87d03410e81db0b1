"""Train the byte-level base model, or a LoRA adapter on a frozen base. Logic: h2q/train.py."""
from h2q.train import cli

if __name__ == "__main__":
    cli()
