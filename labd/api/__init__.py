"""labd's REST + WebSocket API: token auth and roles (:mod:`.auth`, :mod:`.tokens`), the FastAPI
app (:mod:`.app`), live device values and run progress (:mod:`.live`), and the service that serves
it on the daemon's loop (:mod:`.server`)."""

from .app import create_app
from .server import ApiService
from .tokens import Role, TokenStore

__all__ = ["ApiService", "Role", "TokenStore", "create_app"]
