"""The OpenAPI 3.1 description served at /openapi.json.

tests/unit/test_registry_http.py keeps it true: every route of the app is
described here and every path here is a route, with the statuses it returns.
"""

from __future__ import annotations

from trustnet.version import version


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "Bad request (malformed JSON, wrong type, unknown field, invalid value)",
            401: "API key missing", 403: "API key wrong, or statement not signed by the name's key", 404: "Not found",
            409: "Conflict (ipv6 taken, name bound to another key)", 413: "Body too large",
            503: "Registry unavailable"}
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


_WRITE = (400, 401, 403, 413, 503)
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}
_NODE_ID = {"name": "node_id", "in": "path", "required": True, "schema": _NAME}
_CONSISTENCY = {"name": "consistency", "in": "query",
                "description": "Replicated registry: 'linearizable' (default, ReadIndex on the "
                               "leader) or 'stale' (this replica's state). Responses carry "
                               "X-Raft-Index and X-Raft-Term.",
                "schema": {"type": "string", "enum": ["linearizable", "stale"]}}
_BODY = lambda name: {"required": True, "content": {"application/json": {"schema": _ref(name)}}}  # noqa: E731

OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {"title": "TrustNet registry", "version": version(),
             "description": "Node registry: registration, leases renewed by heartbeats, "
                            "domains and peer links. Writes need 'Authorization: Bearer <key>' "
                            "when the registry runs with REGISTRY_API_KEY."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "RegisterNode": {"type": "object", "required": ["id", "ipv6"],
                             "additionalProperties": False, "properties": {
                                 "id": _NAME, "ipv6": {"type": "string", "format": "ipv6"},
                                 "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                                          "default": 9000},
                                 "domain": {**_NAME, "default": "default"}}},
            "Node": {"type": "object", "properties": {
                "id": {"type": "string"}, "domain": {"type": "string"},
                "ipv6": {"type": "string"}, "port": {"type": "integer"},
                "reputation": {"type": "number"},
                "last_heartbeat": {"type": ["string", "null"], "format": "date-time"},
                "registered_at": {"type": "string", "format": "date-time"},
                "lease_deadline": {"type": ["number", "null"],
                                   "description": "Unix seconds when the lease runs out"},
                "public_key": {"type": ["string", "null"]}}},
            "NodePage": {"type": "object", "properties": {
                "nodes": {"type": "array", "items": _ref("Node")},
                "next": {"type": ["string", "null"],
                         "description": "pass as ?after= for the next page"}}},
            "Lease": {"type": "object", "properties": {
                "node_id": {"type": "string"}, "lease_deadline": {"type": "number"},
                "ttl": {"type": "number"}}},
            "Domain": {"type": "object", "properties": {
                "id": {"type": "string"}, "name": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"}}},
            "NewDomain": {"type": "object", "required": ["name"], "additionalProperties": False,
                          "properties": {"name": _NAME}},
            "PeerPair": {"type": "object", "required": ["node_a", "node_b"],
                         "additionalProperties": False,
                         "properties": {"node_a": _NAME, "node_b": _NAME}},
            "NewMember": {"type": "object", "required": ["id", "address"],
                          "additionalProperties": False, "properties": {
                              "id": _NAME, "address": {"type": "string", "pattern": "^wss?://"}}},
            "ClusterStatus": {"type": "object", "properties": {
                "id": {"type": "string"}, "role": {"type": "string"},
                "leader": {"type": ["string", "null"]}, "term": {"type": "integer"},
                "commit": {"type": "integer"}, "applied": {"type": "integer"},
                "members": {"type": "object"}, "lag": {"type": "object"}}},
            "Peer": {"type": "object", "properties": {
                "node_a": {"type": "string"}, "node_b": {"type": "string"},
                "connected_at": {"type": "string", "format": "date-time"}}},
        },
    },
    "paths": {
        "/health": {"get": {"summary": "Liveness and readiness", "responses": {
            "200": _json({"type": "object"}, "Ready"),
            "503": _json({"type": "object"}, "Not ready")}}},
        "/version": {"get": {"summary": "Build information", "responses": {
            "200": _json({"type": "object", "properties": {
                "version": {"type": "string"}, "build_time": {"type": "string"},
                "commit": {"type": "string"}}}, "Version")}}},
        "/openapi.json": {"get": {"summary": "This description", "responses": {
            "200": _json({"type": "object"}, "OpenAPI document")}}},
        "/nodes": {
            "get": {"summary": "List nodes, optionally of one domain, a page at a time",
                    "parameters": [
                        {"name": "domain", "in": "query", "schema": _NAME},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                    "default": 100}},
                        {"name": "after", "in": "query", "schema": _NAME}, _CONSISTENCY],
                    "responses": {"200": _json(_ref("NodePage"), "A page of nodes"),
                                  **_errors(400, 404, 503)}},
            "post": {"summary": "Register or update a node (starts its lease)",
                     "security": [{"bearer": []}], "requestBody": _BODY("RegisterNode"),
                     "responses": {"201": _json(_ref("Node"), "Registered"),
                                   "200": _json(_ref("Node"), "Updated"),
                                   **_errors(*_WRITE, 409)}}},
        "/nodes/{node_id}": {
            "get": {"summary": "One node", "parameters": [_NODE_ID, _CONSISTENCY],
                    "responses": {"200": _json(_ref("Node"), "The node"),
                                  **_errors(400, 404, 503)}},
            "delete": {"summary": "Deregister a node", "parameters": [_NODE_ID],
                       "security": [{"bearer": []}],
                       "responses": {"200": _json(_ref("Node"), "The removed node"),
                                     **_errors(*_WRITE, 404)}}},
        "/nodes/{node_id}/heartbeat": {
            "post": {"summary": "Renew a node's lease (404: register again). A node bound "
                                "to a key sends {\"statement\": <signed statement JSON text>}",
                     "parameters": [_NODE_ID], "security": [{"bearer": []}],
                     "requestBody": {"required": False, "content": {"application/json": {
                         "schema": {"type": "object", "additionalProperties": False,
                                    "properties": {"statement": {"type": "string"}}}}}},
                     "responses": {"200": _json(_ref("Lease"), "Lease renewed"),
                                   **_errors(*_WRITE, 404)}}},
        "/nodes/{node_id}/reputation": {
            "get": {"summary": "A node's reputation in [0, 1] and how it was computed",
                    "parameters": [_NODE_ID],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "reputation": {"type": "number"}, "stored": {"type": "number"},
                        "heartbeats": {"type": "object"}, "links": {"type": "object"}}},
                        "Reputation breakdown"), **_errors(400, 404, 503)}}},
        "/nodes/{node_id}/identity": {
            "delete": {"summary": "Admin: release a node name from the key it is bound to",
                       "parameters": [_NODE_ID], "security": [{"bearer": []}],
                       "responses": {"200": _json({"type": "object"}, "Released"),
                                     **_errors(*_WRITE, 404)}}},
        "/domains": {
            "get": {"summary": "All domains", "responses": {
                "200": _json({"type": "object", "properties": {
                    "domains": {"type": "array", "items": _ref("Domain")}}}, "Domains"),
                **_errors(400, 503)}},
            "post": {"summary": "Create a domain", "security": [{"bearer": []}],
                     "requestBody": _BODY("NewDomain"),
                     "responses": {"201": _json(_ref("Domain"), "Created"),
                                   **_errors(*_WRITE, 409)}}},
        "/peers": {
            "get": {"summary": "Peer links, optionally of one node",
                    "parameters": [{"name": "node", "in": "query", "schema": _NAME}],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "peers": {"type": "array", "items": _ref("Peer")}}}, "Peer links"),
                        **_errors(400, 404, 503)}},
            "post": {"summary": "Record a link between two nodes", "security": [{"bearer": []}],
                     "requestBody": _BODY("PeerPair"),
                     "responses": {"201": _json(_ref("Peer"), "Recorded"),
                                   **_errors(*_WRITE, 404)}},
            "delete": {"summary": "Remove a link (JSON body or ?node_a=&node_b=)",
                       "security": [{"bearer": []}],
                       "requestBody": {**_BODY("PeerPair"), "required": False},
                       "parameters": [{"name": "node_a", "in": "query", "schema": _NAME},
                                      {"name": "node_b", "in": "query", "schema": _NAME}],
                       "responses": {"200": _json(_ref("PeerPair"), "Removed"),
                                     **_errors(*_WRITE, 404)}}},
        "/cluster": {
            "get": {"summary": "Replicated registry: members, leader, term, commit and applied "
                               "index, each member's lag (404 when not replicated)",
                    "responses": {"200": _json(_ref("ClusterStatus"), "Cluster status"),
                                  **_errors(404, 503)}}},
        "/cluster/members": {
            "post": {"summary": "Admin: add a replica (one membership change at a time)",
                     "security": [{"bearer": []}], "requestBody": _BODY("NewMember"),
                     "responses": {"201": _json({"type": "object"}, "Added"),
                                   **_errors(*_WRITE, 404, 409)}}},
        "/cluster/members/{member_id}": {
            "delete": {"summary": "Admin: remove a replica",
                       "parameters": [{"name": "member_id", "in": "path", "required": True,
                                       "schema": _NAME}],
                       "security": [{"bearer": []}],
                       "responses": {"200": _json({"type": "object"}, "Removed"),
                                     **_errors(*_WRITE, 404, 409)}}},
    },
}
