"""The ways to train, one module each, each implementing `gpt.training.objective.Objective`:
next-token cross-entropy and its variants (`lm`), DPO (`dpo`). Importing this package registers
them. Imports every package below it, up to `gpt.training`.
"""
