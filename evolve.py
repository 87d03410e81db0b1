"""Evolve the agents' adapters (live, evaluate, select, breed per cycle). Logic: h2q/evolve/run.py."""
from h2q.evolve.run import cli

if __name__ == "__main__":
    cli()
