"""The ground floor: one-line errors, atomic files, devices and dtypes, random generators,
Ctrl-C, plots. Imports nothing of gpt's outside itself.
"""
