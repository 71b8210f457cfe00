"""The key management service: keys, versions, aliases, crypto Actions, sealing and storage.

Transport-free: the embedded client and (later) the HTTP server are two doors onto
:class:`kmsenv.kms.service.KmsService`, so behaviour, validation and error codes are identical.
Modules, dependencies pointing one way (``service`` → the rest):

- ``context``  EncryptionContext parsing and its canonical form;
- ``blob``     the CiphertextBlob layout (docs/api.md);
- ``sealing``  the root key and sealing of CMK material at rest;
- ``store``    the SQLite store: schema, migrations, transactions, records;
- ``actions``  the table of Actions and their wire parameters (for the CLI and the server);
- ``service``  one typed handler per Action.
"""
