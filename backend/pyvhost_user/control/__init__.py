"""The operator control socket: a QMP-like JSON-lines protocol on a Unix socket.

``commands`` is the protocol without I/O, ``server`` serves it for a
``ControlTarget`` (``target``), ``client`` is a small blocking client (used by
``vhost-user-ctl``).
"""
