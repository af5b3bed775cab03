"""The `isa` application: the command line (`isa ...`, `python -m isa ...`, `torchrun -m isa train ...`)
and the demo. It sits above every library package (isa_triton <- zoo <- eval <- train) and nothing
imports it."""


class UsageError(ValueError):
    """A command line that cannot mean anything: exit code 2, like argparse's own errors (failures exit 1)."""
