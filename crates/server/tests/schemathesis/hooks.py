"""schemathesis hooks for tests/schemathesis.rs.

schemathesis reuses values it saw in responses, so it finds the id of the API key the run
authenticates with (GET /v1/api-keys lists it) and of the host the test registered (GET
/v1/hosts), and sooner or later deletes them: after that every request is a 401 (or every
create a 503) and the rest of the run tests little. A DELETE of one of those is sent for an
unknown id instead (a 404, which the document declares); every other key or host
schemathesis makes or guesses is deleted for real.
"""

import os

import schemathesis

# Path template -> (the id the run depends on, an unknown id of the same shape).
PROTECTED = {
    "/v1/api-keys/{id}": (os.environ.get("WRENN_SCHEMATHESIS_KEY_ID", ""), "key-0000000000000000"),
    "/v1/hosts/{id}": (os.environ.get("WRENN_SCHEMATHESIS_HOST_ID", ""), "host-unknown-to-the-test"),
}


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.method.upper() != "DELETE" or case.operation.path not in PROTECTED:
        return
    protected, stand_in = PROTECTED[case.operation.path]
    if protected and (case.path_parameters or {}).get("id") == protected:
        case.path_parameters["id"] = stand_in
