"""Prints one of the README Quickstart's two commands: `main` (the training example) or
`test` (the test suite). CI runs them verbatim, and tests/test_readme.py checks them."""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def quickstart_commands() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)
    if len(blocks) != 2:
        raise SystemExit(f"README Quickstart must have 2 commands, found {len(blocks)}")
    return dict(zip(("main", "test"), blocks, strict=True))


if __name__ == "__main__":
    print(quickstart_commands()[sys.argv[1]])
