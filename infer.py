"""Talk to the byte-level model: one-shot, an interactive REPL, or a guided demo. Logic: h2q/infer.py."""
from h2q.infer import cli

if __name__ == "__main__":
    cli()
