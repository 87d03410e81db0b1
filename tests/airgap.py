"""Run an entry-point script with every network connection made to fail.

Usage: python tests/airgap.py SCRIPT [ARGS...]. Patches socket connect/DNS before anything else is
imported, so a code path that tries the network raises instead of reaching it.
"""
import runpy
import socket
import sys


def refuse(*args, **kwargs):
    raise OSError("network access attempted in an air-gapped run")


socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
