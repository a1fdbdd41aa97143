"""
The session layer: a connection that outlives the links under it.

 - L{wire}: what a session says inside its links' records (pure);
 - L{params}: its knobs (resume limit, window, liveness, rotation);
 - L{session}: the durable session: numbering, acks, credit, liveness,
   moves between links, the honest close;
 - L{stream}: the user's transport on a session;
 - L{attach}: where a secured link becomes a session (initiator) or joins
   one (the listener's table).
"""
