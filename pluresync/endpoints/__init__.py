"""
The endpoint strings users write (C{relay:}, C{auto:}), their parsers (the
plugin in C{twisted/plugins/pluresync_endpoints.py}) and the paths they race.
"""
