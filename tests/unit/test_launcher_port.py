"""The launcher refuses a port another agent listens on, and only that: the
connections an agent leaves in TIME_WAIT when it ends must not make the next
agent on the same port (the lab's fixed 50151) fail to start."""

import socket

import pytest

from tidegate.lab.launcher import AgentNotReady, free_port, port_free_or_raise


def test_a_listener_on_the_port_is_refused():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC's server does
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(AgentNotReady, match=f"127.0.0.1:{port} is taken"):
            port_free_or_raise("127.0.0.1", port)


def test_time_wait_left_by_an_ended_agent_is_not_taken():
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its end of the connection stays in TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    states = open("/proc/net/tcp").read()
    assert f":{port:04X} " in states, "the closed connection should have left TIME_WAIT on the port"
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did: it called this port taken
    port_free_or_raise("127.0.0.1", port)
