"""Contract suites for graven's ports: subclass one per adapter; the test ids name it."""
