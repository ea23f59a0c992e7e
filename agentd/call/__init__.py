"""One call's pure state machine, composed of small machines each with its own table."""

from agentd.call.call import Call
from agentd.call.history import Msg
from agentd.call.phase import Phase
from agentd.call.settings import DEFAULT_FALLBACK, DEFAULT_GREETING, CallSettings

__all__ = ["DEFAULT_FALLBACK", "DEFAULT_GREETING", "Call", "CallSettings", "Msg", "Phase"]
