"""hxb's demo function: greets whoever calls it, through the Invoke API or the HTTP trigger."""

import json
import logging
import os

logger = logging.getLogger()
invocations = 0  # module state survives between invocations of one warm instance


def handler(event, context):
    global invocations
    invocations += 1
    http = isinstance(event, dict) and "requestContext" in event
    if http:
        params = event.get("queryStringParameters") or {}
        name = params.get("name", "world")
    else:
        name = (event or {}).get("name", "world") if isinstance(event, dict) else "world"
    logger.info("greeting %s", name)
    body = {
        "message": f"{os.environ['GREETING']}, {name}!",
        "function": context.function_name,
        "request_id": context.aws_request_id,
        "warm_invocations": invocations,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
    if http:
        return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(body)}
    return body
