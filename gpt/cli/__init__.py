"""The commands (`python -m gpt <command>`, the `gpt-*` console scripts, train.py and
generate.py). The top: Imports every other package; none imports it.
"""
