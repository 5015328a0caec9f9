"""Test protocol: aim escape sequences, markup and bad Unicode at the operator's terminal."""

# Clear screen and home, a fake green OK, an OSC 52 clipboard write, 8-bit CSI,
# a bidi override, rich markup that once crashed the CLI, and a carriage return.
HOSTILE = (
    "\x1b[2J\x1b[H \x1b[1;32mOK\x1b[0m \x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07 "
    "\x9b31m \u202eexe.pdf [/] [bold red]x[/] fake\rOK"
)


def run(ctx):
    mode = ctx.parameters["mode"]
    ctx.progress.run_start()
    ctx.progress.step(1, 3, info="[/]")
    ctx.progress.step(2, 3, info=HOSTILE)
    ctx.progress.step(3, 3, info="\x1b]0;pwned\x07\x1bc")
    ctx.file_failed("records.csv", HOSTILE)
    ctx.progress.run_end()
    if mode == "raise":
        raise type("Evil\x1b[2J\x9b", (ValueError,), {})(HOSTILE)
    if mode == "surrogate":
        return {"name": "lone \ud800 surrogate"}
    return {HOSTILE: [HOSTILE, 1.5]}
