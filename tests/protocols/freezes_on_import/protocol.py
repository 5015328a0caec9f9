__import__("os").kill(__import__("os").getpid(), __import__("signal").SIGSTOP)
# Test protocol: freeze the whole sandbox (heartbeat thread included) on the
# module's first line, before run() exists.


def run(ctx):
    return "thawed"
