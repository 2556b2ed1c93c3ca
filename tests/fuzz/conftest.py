"""The fuzz tests print what they saw (outcome and refusal kinds) in the terminal summary."""

from __future__ import annotations

import fuzzlib


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, lines in fuzzlib.REPORTS:
        terminalreporter.section(title, sep="-")
        for line in lines:
            terminalreporter.write_line(line)
