"""Tool-using, multi-turn rollouts (docs/tools.md): schemas, the call format, the `python` tool, sessions."""
from fastdash.tools.calls import FORMATS, ToolCall, cap_output, parse_calls, response_text
from fastdash.tools.session import Episode, EpisodeStats, ToolSession, build_session

__all__ = ["FORMATS", "ToolCall", "cap_output", "parse_calls", "response_text", "Episode", "EpisodeStats",
           "ToolSession", "build_session"]
