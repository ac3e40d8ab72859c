"""``python -m emulators.zoho_crm --port N``: serve the Zoho CRM emulator on 127.0.0.1."""

from emulators.zoho_crm import main

main()
