"""``python -m emulators.salesforce --port N``: serve the Salesforce emulator on 127.0.0.1."""

from emulators.salesforce import main

main()
