"""The Gen-Searcher agent: protocol, prompts, episode loop, policy client and tools (spec/agent.md).

Import the pieces from their modules (`gsjax.agent.loop`, `gsjax.agent.tools`, ...); this package
file stays import-free so `gsjax --help` does not pay for httpx/PIL.
"""
