"""Asynchronous invocations (Lambda's `Event` type): events kept durably in the store, run by a
dispatcher with retries, destinations and a dead-letter list.

`events.py` the event record; `policy.py` retry and expiry decisions; `destinations.py` the
records destinations receive; `schedule.py` which event runs next; `dispatcher.py` the task
that runs them. Importing this package imports none of them (the store imports `events`)."""
