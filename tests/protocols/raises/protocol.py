"""Test protocol: fail the way protocol code fails."""


class CalibrationError(ValueError):
    pass


def _calibrate(level):
    raise CalibrationError(f"calibration drifted to {level}")


def run(ctx):
    _calibrate(ctx.parameters.get("level", 42))
