"""The OpenAI-compatible HTTP server over the engine (app.py), and `moedeploy serve` (cli.py)."""
