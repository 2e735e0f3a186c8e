"""Domain instructors: `device.*`, `model.*`, `inference.*` and `postprocessing.*` commands.

Each instructor answers the commands of its domain with plain dicts; the
facade routes to it and wraps the envelope. `processing.*` (the nine
protocol commands) are the facade's own methods.
"""
