"""What the gateway calls on every model request: holds (reserve, capture, release), one-shot charges,
and the generation records it reads back. Every call is one short transaction on the account's own rows.
"""
