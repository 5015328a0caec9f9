"""Test protocol: allocate (and touch) far more memory than the sandbox may have."""


def run(ctx):
    ctx.progress.run_start()
    hoard = []
    for _ in range(4096):
        hoard.append(bytearray(16 * 1024 * 1024))
    return len(hoard)
