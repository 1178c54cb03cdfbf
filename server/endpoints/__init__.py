"""The service's routes, one module per group, each an ``APIRouter`` over the shared :class:`ServiceState`."""
