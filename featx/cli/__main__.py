"""Allow ``python -m featx.cli`` (``python -m featx`` does the same)."""

from featx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
