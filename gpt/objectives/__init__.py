"""The ways to train, one module each, each implementing `gpt.training.run.Objective`:
next-token cross-entropy and its variants (`lm`), DPO (`dpo`), GRPO (`grpo`, with `rollouts` and
`rewards`). Importing this package registers them, in this order (--objective's choices). Imports
every package below it, up to `gpt.training`.
"""

# Imported to register them, in the order of --objective's choices: the default first.
from gpt.objectives import lm  # noqa: I001, F401
from gpt.objectives import dpo  # noqa: F401
from gpt.objectives import grpo  # noqa: F401
