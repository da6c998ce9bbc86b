//! `POST /v1/responses` in front of a Chat-Completions-only upstream: the official `openai`
//! Python SDK's own parsers on our objects and events, `previous_response_id` chains (what the
//! upstream was sent), a chain across a gateway restart and across replicas on Redis, stored
//! responses and their 404s, and the passthrough to an upstream that has the Responses API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use std::time::Duration;

use mock_upstream::Server;
use reqwest::Method;
use serde_json::{json, Value};
use support::gateway::{get_json, Gateway, AUTH};
use support::stores::{self, Store};
use support::{chunks, fixtures, Chunk, Harness, Reply};

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// A non-streamed answer calling `get_weather` once, with `call_id`.
fn weather_call(call_id: &str) -> Value {
    let mut completion = fixtures::completion("");
    completion["choices"][0]["message"] = json!({
        "role": "assistant",
        "content": null,
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]
    });
    completion["choices"][0]["finish_reason"] = "tool_calls".into();
    completion
}

/// A streamed answer with reasoning first, as llama-server sends a thinking model's.
fn reasoning_stream() -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = ["Two and ", "two."]
        .iter()
        .map(|r| Chunk::json(json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"reasoning_content": r}}]})))
        .collect();
    chunks.extend(support::chunks(&["4"], None));
    chunks
}

fn reasoning_completion() -> Value {
    let mut completion = fixtures::completion("4");
    completion["choices"][0]["message"]["reasoning_content"] = "Two and two.".into();
    completion
}

/// `POST /v1/responses` with `body` to `base`, as the test client.
async fn create(client: &reqwest::Client, base: &str, body: Value) -> reqwest::Response {
    client
        .post(format!("{base}/v1/responses"))
        .header("authorization", AUTH)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of a Responses stream, parsed.
fn events(body: &str) -> Vec<Value> {
    support::sse_data(body).iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test]
async fn official_python_sdk_uses_the_responses_api_over_a_chat_only_upstream() {
    // Given a Chat-Completions upstream scripted in the order the SDK script calls it
    let mut stream = chunks(&["one ", "two"], None);
    stream.insert(stream.len() - 1, Chunk::json(fixtures::usage_chunk()));
    let mut tool_stream: Vec<Chunk> = fixtures::tool_call_chunks().into_iter().map(Chunk::json).collect();
    tool_stream.push(Chunk::done());
    let upstream = Server::builder()
        .chat(fixtures::completion("Hello from the gateway"))
        .stream(stream)
        .chat(weather_call("call_w"))
        .chat(fixtures::completion("It is sunny in Paris."))
        .stream(tool_stream)
        .stream(vec![Chunk::json(fixtures::content_chunk(0, "par"))])
        .stream(reasoning_stream())
        .chat(reasoning_completion());
    let h = Harness::builder().upstream(upstream).start().await;

    // When the SDK script runs against the gateway
    let seen = support::python::run_script("responses_sdk.py", &h.v1(""), b"").await;

    // Then the SDK parsed a Response object, with usage in the Responses shape and the
    // request's metadata echoed
    let plain = &seen["plain"];
    assert!(plain["id"].as_str().unwrap().starts_with("resp_"), "{plain}");
    assert_eq!(plain["object"], "response");
    assert_eq!(plain["status"], "completed");
    assert_eq!(plain["text"], "Hello from the gateway");
    assert_eq!(plain["input_tokens"], 12);
    assert_eq!(plain["cached_tokens"], 4);
    assert_eq!(plain["output_tokens"], 5);
    assert_eq!(plain["metadata"], json!({"run": "sdk"}));
    assert_eq!(plain["max_output_tokens"], 64);

    // And the SDK's stream helper accepted the events, numbered from 0 without a gap
    let streamed = &seen["stream"];
    assert_eq!(streamed["text"], "one two");
    assert_eq!(streamed["status"], "completed");
    assert_eq!(streamed["previous_response_id"], plain["id"]);
    assert_eq!(streamed["output_tokens"], 5);
    let types: Vec<&str> =
        streamed["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let numbers: Vec<u64> =
        streamed["sequence_numbers"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..types.len() as u64).collect::<Vec<_>>());

    // And a function call came back as a function_call item, and its output continued the chain
    assert_eq!(
        seen["tool_call"],
        json!({"name": "get_weather", "arguments": {"city": "Paris"}, "call_id": "call_w"})
    );
    assert_eq!(seen["tool_answer"], "It is sunny in Paris.");
    // (the mock's two parallel calls stream their argument fragments interleaved)
    let [args0, args1] = fixtures::tool_call_arguments();
    assert_eq!(seen["stream_tool"]["arguments_by_item"], json!([args0, args1]));
    assert_eq!(seen["stream_tool"]["done_arguments"], json!([args0, args1]));
    assert!(seen["strictly_validated_events"].as_u64().unwrap() > 10, "{seen}");
    assert_eq!(seen["stream_tool"]["completed_calls"], json!([args0, args1]));

    // And the stored response was retrieved, listed and deleted; then it is gone, and an
    // unknown previous_response_id is a 404 the SDK raises as NotFoundError
    assert_eq!(
        seen["retrieve"],
        json!({"id": plain["id"], "text": "Hello from the gateway", "status": "completed"})
    );
    assert_eq!(seen["input_items"], json!([{"type": "message", "role": "user", "text": "Say hello"}]));
    assert_eq!(seen["after_delete"], json!({"status": 404, "code": "response_not_found"}));
    assert_eq!(seen["unknown_previous"], json!({"status": 404, "code": "response_not_found"}));

    // And a stream cut short ends with the typed error and response.failed events
    assert_eq!(
        seen["cut"],
        json!({"last": ["error", "response.failed"], "status": "failed", "error_code": "server_error", "error_event_code": "upstream_error"})
    );

    // And a model's reasoning_content is a reasoning item, streamed as reasoning_text events
    assert_eq!(
        seen["reasoning"],
        json!({"deltas": "Two and two.", "stream_items": ["reasoning", "message"],
               "items": ["reasoning", "message"], "text": "Two and two.", "answer": "4"})
    );

    // And the upstream only ever saw Chat Completions requests, with the chain rebuilt
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded.len(), 8, "the unknown previous_response_id never reached the upstream");
    assert!(recorded.iter().all(|r| r.path == "/v1/chat/completions"));
    let first = recorded[0].json();
    assert_eq!(first["messages"], json!([{"role": "system", "content": "Be terse."}, user("Say hello")]));
    assert_eq!(first["max_tokens"], 64);
    assert!(first.get("metadata").is_none() && first.get("input").is_none(), "{first}");
    let second = recorded[1].json();
    // OpenAI does not carry `instructions` over to the next response of a chain
    assert_eq!(
        second["messages"],
        json!([user("Say hello"), assistant("Hello from the gateway"), user("Count")])
    );
    assert_eq!(second["stream"], true);
    assert_eq!(second["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        recorded[2].json()["tools"],
        json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city", "strict": true,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": false}
        }}])
    );
    assert_eq!(
        recorded[3].json()["messages"],
        json!([
            user("Weather in Paris?"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_w", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_w", "content": "sunny, 21C"}
        ])
    );

    // And the chain is a session named by its first response: its transcript holds the
    // conversation through the streamed answer
    let first_id = plain["id"].as_str().unwrap();
    let transcript = stores::transcript(&h.client, &h.url, first_id, "Bearer sk-sdk-test").await;
    assert_eq!(
        transcript,
        [user("Say hello"), assistant("Hello from the gateway"), user("Count"), assistant("one two")]
    );
}

/// A chain's second turn, on `second` after its first on `first`: what the upstream was sent.
async fn chain_across(first: &Gateway, second: &Gateway, upstream: &Server) -> String {
    let client = reqwest::Client::new();
    let r1 = create(
        &client,
        &first.base,
        json!({"model": "mock-model", "instructions": "Be terse.", "input": "Name a colour."}),
    )
    .await;
    assert_eq!(r1.status(), 200);
    let r1: Value = r1.json().await.unwrap();
    let id = r1["id"].as_str().unwrap().to_string();

    let r2 = create(
        &client,
        &second.base,
        json!({"model": "mock-model", "instructions": "Be terse.", "input": "Another?", "previous_response_id": id, "stream": true}),
    )
    .await;
    assert_eq!(r2.status(), 200);
    let events = events(&r2.text().await.unwrap());
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{events:?}");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "Green again.");

    let sent = upstream.requests().last().unwrap().json();
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "Be terse."}, user("Name a colour."), assistant("Blue."), user("Another?")])
    );
    // The first response is still there to read, on the second gateway too
    let got = client
        .get(format!("{}/v1/responses/{id}", second.base))
        .header("authorization", AUTH)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let got: Value = got.json().await.unwrap();
    assert_eq!(got["output"][0]["content"][0]["text"], "Blue.");
    id
}

fn colour_upstream() -> mock_upstream::Builder {
    Server::builder().chat(fixtures::completion("Blue.")).stream(chunks(&["Green ", "again."], None))
}

#[tokio::test]
async fn a_chain_continues_across_a_gateway_restart_on_the_embedded_store() {
    // Given a gateway on an embedded store that answers the first response of a chain
    let store = Store::Embedded.url().await;
    let upstream = colour_upstream().start().await.unwrap();
    let mut before = Gateway::start(&upstream.base_url(), &store.url).await;
    let client = reqwest::Client::new();
    let r1: Value = create(
        &client,
        &before.base,
        json!({"model": "mock-model", "instructions": "Be terse.", "input": "Name a colour."}),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = r1["id"].as_str().unwrap();

    // When it is killed and another process opens the same file
    before.kill();
    let after = Gateway::start(&upstream.base_url(), &store.url).await;

    // Then the chain continues there: the upstream is sent the whole conversation
    let r2 = create(
        &client,
        &after.base,
        json!({"model": "mock-model", "instructions": "Be terse.", "input": "Another?", "previous_response_id": id, "stream": true}),
    )
    .await;
    assert_eq!(r2.status(), 200);
    let events = events(&r2.text().await.unwrap());
    assert_eq!(events.last().unwrap()["type"], "response.completed", "{events:?}");
    let sent = upstream.requests().last().unwrap().json();
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "Be terse."}, user("Name a colour."), assistant("Blue."), user("Another?")])
    );
    // And the session the chain runs on holds both turns, with no history rewritten
    let session = get_json(&client, &format!("{}/v1/sessions/{id}", after.base)).await;
    assert_eq!(session["messages"], 5, "{session}");
    assert_eq!(session["history_rewrites"], 0, "{session}");
}

async fn a_chain_moves_between_replicas(store: Store) {
    // Given two gateways sharing one Redis
    let store = store.url().await;
    let upstream = colour_upstream().start().await.unwrap();
    let url = upstream.base_url();
    let (a, b) = tokio::join!(Gateway::start(&url, &store.url), Gateway::start(&url, &store.url));
    // Then a chain started on one continues on the other
    chain_across(&a, &b, &upstream).await;
}

on_redis_and_cluster!(a_chain_moves_between_replicas);

#[tokio::test]
async fn stored_responses_are_the_callers_own_and_unknown_ids_are_404() {
    let h = Harness::builder().upstream(Server::builder().chat(fixtures::completion("Mine."))).start().await;
    let owner = "Bearer sk-owner";
    let r: Value = h
        .client
        .post(h.v1("/responses"))
        .header("authorization", owner)
        .json(&json!({"model": "mock-model", "input": "hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["id"].as_str().unwrap();
    let get =
        |path: String, auth: &'static str| h.client.get(h.v1(&path)).header("authorization", auth).send();

    // The owner reads it and its input items
    assert_eq!(get(format!("/responses/{id}"), owner).await.unwrap().status(), 200);
    let items: Value =
        get(format!("/responses/{id}/input_items"), owner).await.unwrap().json().await.unwrap();
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"][0]["content"][0], json!({"type": "input_text", "text": "hi"}));
    assert_eq!(items["first_id"], items["data"][0]["id"]);

    // Another caller gets 404 for the same id, in OpenAI's error shape; so does anyone for an
    // unknown id, its items, its deletion, or a chain from it
    for (method, path, auth) in [
        ("GET", format!("/responses/{id}"), "Bearer sk-other"),
        ("GET", format!("/responses/{id}/input_items"), "Bearer sk-other"),
        ("DELETE", format!("/responses/{id}"), "Bearer sk-other"),
        ("GET", "/responses/resp_nope".to_string(), owner),
        ("DELETE", "/responses/resp_nope".to_string(), owner),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response =
            h.client.request(method.clone(), h.v1(&path)).header("authorization", auth).send().await.unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], "response_not_found", "{body}");
    }
    let chained = h
        .client
        .post(h.v1("/responses"))
        .header("authorization", "Bearer sk-other")
        .json(&json!({"model": "mock-model", "input": "hi", "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(chained.status(), 404);

    // And the owner's delete answers OpenAI's deletion object, after which the id is gone
    let deleted = h
        .client
        .delete(h.v1(&format!("/responses/{id}")))
        .header("authorization", owner)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        deleted.json::<Value>().await.unwrap(),
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    assert_eq!(get(format!("/responses/{id}"), owner).await.unwrap().status(), 404);
    assert_eq!(h.upstream(0).requests().len(), 1);
}

#[tokio::test]
async fn store_false_keeps_neither_the_response_nor_a_session() {
    let h =
        Harness::builder().upstream(Server::builder().chat(fixtures::completion("Ephemeral."))).start().await;
    let r = h
        .v1_as_client(Method::POST, "/responses")
        .json(&json!({"model": "mock-model", "input": "hi", "store": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ctxgate-session-version").is_none(), "not a session turn");
    let r: Value = r.json().await.unwrap();
    assert_eq!(r["store"], false);
    assert_eq!(r["output"][0]["content"][0]["text"], "Ephemeral.");
    // The gateway's own time on the turn is measured as on chat's route.
    let overhead = r#"ctxgate_gateway_overhead_seconds_count{route="responses"}"#;
    assert_eq!(h.metric(overhead).await, 1.0);
    let id = r["id"].as_str().unwrap();
    let got = h.v1_as_client(Method::GET, &format!("/responses/{id}")).send().await.unwrap();
    assert_eq!(got.status(), 404);
    let session = h.v1_as_client(Method::GET, &format!("/sessions/{id}")).send().await.unwrap();
    assert_eq!(session.status(), 404);
}

#[tokio::test]
async fn a_stream_cut_short_fails_the_response_and_an_upstream_error_passes_through() {
    // Given an upstream whose stream stops before its end, then one that refuses a request
    let cut = vec![Chunk::json(fixtures::content_chunk(0, "par"))];
    let refused = Reply::json(
        400,
        fixtures::error("This model's maximum context length is exceeded.", "invalid_request_error"),
    );
    let h = Harness::builder().upstream(Server::builder().stream(cut).reply(refused)).start().await;

    // Then the stream ends with an error event and response.failed, after the text it had
    let r = h
        .v1_as_client(Method::POST, "/responses")
        .json(&json!({"model": "mock-model", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = events(&r.text().await.unwrap());
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert!(kinds.contains(&"response.output_text.delta"), "{kinds:?}");
    assert_eq!(&kinds[kinds.len() - 2..], ["error", "response.failed"], "{kinds:?}");
    let failed = &events.last().unwrap()["response"];
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"]["message"].as_str().unwrap().contains("ended before"), "{failed}");
    // And a failed response is not stored
    let id = failed["id"].as_str().unwrap();
    let got = h.v1_as_client(Method::GET, &format!("/responses/{id}")).send().await.unwrap();
    assert_eq!(got.status(), 404);

    // And the upstream's own error reaches the client as it sent it
    let r = h
        .v1_as_client(Method::POST, "/responses")
        .json(&json!({"model": "mock-model", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "This model's maximum context length is exceeded.");
}

#[tokio::test]
async fn an_upstream_with_the_responses_api_gets_the_request_as_sent() {
    // Given an upstream configured as speaking the Responses API
    let answer = json!({"id": "resp_upstream", "object": "response", "status": "completed", "output": []});
    let h = Harness::builder()
        .upstream(Server::builder().chat(answer.clone()).chat(answer.clone()).chat(answer.clone()))
        .config(|c| c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses))
        .start()
        .await;
    let body = json!({"model": "mock-model", "input": "hi", "include": ["reasoning.encrypted_content"], "store": false, "future_field": 1});
    let r = h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), answer);
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded[0].path, "/v1/responses");
    assert_eq!(recorded[0].json(), body);

    // And a chain the upstream keeps itself (an id the gateway does not hold) goes on as sent,
    // and its answer is left to the upstream: reading it asks the upstream
    let chained = json!({"model": "mock-model", "input": "more", "previous_response_id": "resp_upstream"});
    let r = h.v1_as_client(Method::POST, "/responses").json(&chained).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let got = h.v1_as_client(Method::GET, "/responses/resp_upstream").send().await.unwrap();
    assert_eq!(got.status(), 200);
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded[1].json(), chained);
    assert_eq!(
        (recorded[2].method.as_str(), recorded[2].path.as_str()),
        ("GET", "/v1/responses/resp_upstream")
    );
}

#[tokio::test]
async fn unknown_request_fields_reach_a_chat_upstream() {
    let h = Harness::builder().upstream(Server::builder().chat(fixtures::completion("ok"))).start().await;
    let body = json!({
        "model": "mock-model", "input": "hi", "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7,
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}},
        "parallel_tool_calls": false, "user": "u-1",
    });
    let r: Value =
        h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap().json().await.unwrap();
    // The Response object echoes the request
    assert_eq!(r["temperature"], 0.2);
    assert_eq!(r["top_p"], 0.9);
    assert_eq!(r["text"]["format"]["name"], "answer");
    assert_eq!(r["parallel_tool_calls"], false);
    let sent = h.upstream(0).requests()[0].json();
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["top_k"], 40);
    assert_eq!(sent["seed"], 7);
    assert_eq!(sent["user"], "u-1");
    assert_eq!(
        sent["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}})
    );
    // Without tools, chat's tool options are not sent (servers refuse them alone)
    assert!(sent.get("parallel_tool_calls").is_none(), "{sent}");
}

#[tokio::test]
async fn a_chain_forks_from_any_of_its_responses() {
    // Given a chain r1 → r2
    let upstream = Server::builder()
        .chat(fixtures::completion("Blue."))
        .chat(fixtures::completion("Green."))
        .chat(fixtures::completion("Red."))
        .chat(fixtures::completion("Yellow."));
    let h = Harness::builder().upstream(upstream).start().await;
    let ask = |input: &'static str, previous: Option<String>| {
        let mut body = json!({"model": "mock-model", "input": input});
        if let Some(previous) = previous {
            body["previous_response_id"] = previous.into();
        }
        let request = h.v1_as_client(Method::POST, "/responses").json(&body);
        async move {
            let response: Value = request.send().await.unwrap().json().await.unwrap();
            response["id"].as_str().unwrap().to_string()
        }
    };
    let r1 = ask("Colour?", None).await;
    let r2 = ask("Another?", Some(r1.clone())).await;

    // When a response continues from r1 again, and then one from r2
    ask("A third?", Some(r1.clone())).await;
    ask("A fourth?", Some(r2)).await;

    // Then each was sent the conversation of the response it names, not the latest one
    let sent: Vec<Value> = h.upstream(0).requests().iter().map(|r| r.json()["messages"].clone()).collect();
    assert_eq!(sent[2], json!([user("Colour?"), assistant("Blue."), user("A third?")]));
    assert_eq!(
        sent[3],
        json!([
            user("Colour?"),
            assistant("Blue."),
            user("Another?"),
            assistant("Green."),
            user("A fourth?")
        ])
    );
    // And the chain's session counts the forks as history rewrites
    let session: Value =
        h.v1_as_client(Method::GET, &format!("/sessions/{r1}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(session["history_rewrites"], 2, "{session}");
    assert_eq!(session["messages"], 6, "{session}");
}

#[tokio::test]
async fn an_id_the_gateway_does_not_hold_goes_to_a_responses_upstream() {
    // Given an upstream with the Responses API, which holds responses of its own
    let theirs = json!({"id": "resp_theirs", "object": "response", "status": "completed", "output": []});
    let h = Harness::builder()
        .upstream(Server::builder().chat(theirs.clone()))
        .config(|c| c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses))
        .start()
        .await;
    let got = h.v1_as_client(Method::GET, "/responses/resp_theirs").send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.json::<Value>().await.unwrap(), theirs);
    let recorded = h.upstream(0).requests();
    assert_eq!(
        (recorded[0].method.as_str(), recorded[0].path.as_str()),
        ("GET", "/v1/responses/resp_theirs")
    );
}

#[tokio::test]
async fn the_session_header_names_the_session_a_response_runs_on() {
    let h = Harness::builder().upstream(Server::builder().chat(fixtures::completion("Noted."))).start().await;
    let r = h
        .v1_as_client(Method::POST, "/responses")
        .header("x-session-id", "my-thread")
        .json(&json!({"model": "mock-model", "input": "Remember this."}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-ctxgate-session-version"), "a session turn's answer");
    let transcript = stores::transcript(&h.client, &h.url, "my-thread", AUTH).await;
    assert_eq!(transcript, [user("Remember this."), assistant("Noted.")]);
    assert!(!h.upstream(0).requests()[0].headers.contains_key("x-session-id"));
}

/// A Response object as an upstream with the Responses API answers, saying `text`.
fn upstream_response(id: &str, text: &str) -> Value {
    json!({
        "id": id, "object": "response", "created_at": 1, "status": "completed", "model": "gpt-x",
        "output": [{"id": format!("msg_{id}"), "type": "message", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}
    })
}

#[tokio::test]
async fn the_gateway_keeps_a_chain_on_an_upstream_with_the_responses_api() {
    // Given an upstream with the Responses API that answers once in JSON, then as a stream
    let second = upstream_response("resp_up2", "Green.");
    let stream = vec![
        Chunk::json(
            json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up2", "status": "in_progress"}}),
        ),
        Chunk::json(json!({"type": "response.output_text.delta", "sequence_number": 1, "delta": "Green."})),
        Chunk::json(json!({"type": "response.completed", "sequence_number": 2, "response": second})),
    ];
    let h = Harness::builder()
        .upstream(Server::builder().chat(upstream_response("resp_up1", "Blue.")).stream(stream))
        .config(|c| c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses))
        .start()
        .await;
    let post = |body: Value| h.v1_as_client(Method::POST, "/responses").json(&body).send();

    // When a chain's first response is answered there, and the second names it
    let r1 = post(json!({"model": "gpt-x", "input": "Colour?"})).await.unwrap();
    assert_eq!(r1.json::<Value>().await.unwrap(), upstream_response("resp_up1", "Blue."));
    let r2 = post(
        json!({"model": "gpt-x", "input": "Another?", "previous_response_id": "resp_up1", "stream": true}),
    )
    .await
    .unwrap();
    let events = events(&r2.text().await.unwrap());

    // Then the client got the upstream's events as they were
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["response"], second);
    // And the upstream was sent the conversation in `input`, not an id it may not hold
    let sent = h.upstream(0).requests()[1].json();
    assert!(sent.get("previous_response_id").is_none(), "{sent}");
    assert_eq!(
        sent["input"],
        json!([
            {"type": "message", "role": "user", "content": "Colour?"},
            upstream_response("resp_up1", "Blue.")["output"][0],
            {"type": "message", "role": "user", "content": "Another?"}
        ])
    );
    // And both responses are the gateway's to read, without asking the upstream
    for (id, object) in [("resp_up1", upstream_response("resp_up1", "Blue.")), ("resp_up2", second)] {
        let got = h.v1_as_client(Method::GET, &format!("/responses/{id}")).send().await.unwrap();
        assert_eq!(got.status(), 200, "{id}");
        assert_eq!(got.json::<Value>().await.unwrap(), object);
    }
    assert_eq!(h.upstream(0).requests().len(), 2);
}

#[tokio::test]
async fn a_chain_moves_from_a_chat_upstream_to_a_responses_upstream() {
    // Given model `local` on a chat-only upstream and model `gpt-x` on one with the Responses API
    let h = Harness::builder()
        .upstream(Server::builder().chat(fixtures::completion("Blue.")))
        .upstream(Server::builder().chat(upstream_response("resp_up", "Green.")))
        .config(|c| {
            c.upstreams[1].api = Some(ctxgate::config::UpstreamApi::Responses);
            c.routes = vec![
                ctxgate::config::RouteConfig { models: vec!["local".into()], upstreams: vec!["u0".into()] },
                ctxgate::config::RouteConfig { models: vec!["gpt-x".into()], upstreams: vec!["u1".into()] },
            ];
        })
        .start()
        .await;
    let post = |body: Value| h.v1_as_client(Method::POST, "/responses").json(&body).send();
    let r1: Value = post(json!({"model": "local", "input": "Colour?"})).await.unwrap().json().await.unwrap();

    // When the chain continues on the other model
    let r2 =
        post(json!({"model": "gpt-x", "input": "Another?", "previous_response_id": r1["id"]})).await.unwrap();
    assert_eq!(r2.status(), 200);

    // Then the Responses upstream was sent the whole conversation as items
    assert_eq!(h.upstream(0).requests()[0].path, "/v1/chat/completions");
    let sent = h.upstream(1).requests()[0].json();
    assert_eq!(h.upstream(1).requests()[0].path, "/v1/responses");
    let input = sent["input"].as_array().unwrap();
    assert_eq!(input.len(), 3, "{sent}");
    assert_eq!(input[0], json!({"type": "message", "role": "user", "content": "Colour?"}));
    assert_eq!((input[1]["type"].as_str(), input[1]["role"].as_str()), (Some("message"), Some("assistant")));
    assert_eq!(input[1]["content"][0]["text"], "Blue.");
    assert_eq!(input[2], json!({"type": "message", "role": "user", "content": "Another?"}));
}

#[tokio::test]
async fn a_chain_keeps_its_pool_endpoint_as_its_session_does() {
    // Given a pool of three endpoints with affinity
    let mut builder = Harness::builder();
    for _ in 0..3 {
        builder = builder.upstream(Server::builder());
    }
    let h = builder
        .config(|c| {
            let endpoints = c.upstreams.iter().map(|u| u.base_url.clone()).collect();
            let pool = ctxgate::config::PoolConfig { endpoints, affinity: true, ..Default::default() };
            c.upstreams = vec![ctxgate::config::UpstreamConfig {
                name: "pool".into(),
                pool: Some(pool),
                ..ctxgate::config::UpstreamConfig::default()
            }];
            c.routes.clear();
        })
        .start()
        .await;

    // When chains take three turns, the first with instructions and the others without (the
    // prefix they send changes; the session they run on does not)
    for chain in 0..12 {
        let mut previous: Option<String> = None;
        let mut home: Option<String> = None;
        for turn in 0..3 {
            let mut body = json!({"model": "mock-model", "input": format!("chain {chain} turn {turn}")});
            if turn == 0 {
                body["instructions"] = json!(format!("You are assistant {chain}."));
            }
            if let Some(id) = &previous {
                body["previous_response_id"] = json!(id);
            }
            let r = h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let endpoint = r.headers()["x-ctxgate-upstream-endpoint"].to_str().unwrap().to_string();
            // Then every turn of a chain lands where its first did
            assert_eq!(
                home.get_or_insert_with(|| endpoint.clone()),
                &endpoint,
                "chain {chain} moved at turn {turn}"
            );
            let r: Value = r.json().await.unwrap();
            previous = r["id"].as_str().map(str::to_string);
        }
    }
}

#[tokio::test]
async fn a_chains_session_applies_its_goal_lock_with_a_byte_stable_prefix() {
    let h = Harness::builder().start().await;
    let post = |body: Value| h.v1_as_client(Method::POST, "/responses").json(&body).send();
    let turn = |input: &str, previous: &str| json!({"model": "mock-model", "instructions": "Be terse.", "input": input, "previous_response_id": previous});
    let r1: Value = post(json!({"model": "mock-model", "instructions": "Be terse.", "input": "a"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r1["id"].as_str().unwrap();

    // When the goal of the chain's session is locked
    lock_goal(&h, id).await;

    // Then the chain's next turns carry it right after the instructions, in the same bytes,
    // behind a prefix that does not change from one turn to the next
    let r2: Value = post(turn("b", id)).await.unwrap().json().await.unwrap();
    let r3 = post(turn("c", r2["id"].as_str().unwrap())).await.unwrap();
    assert_eq!(r3.status(), 200);
    let raw = |i: usize| -> Vec<String> {
        #[derive(serde::Deserialize)]
        struct Body {
            messages: Vec<Box<serde_json::value::RawValue>>,
        }
        let body: Body = serde_json::from_slice(&h.upstream(0).requests()[i].body).unwrap();
        body.messages.iter().map(|m| m.get().to_string()).collect()
    };
    let (second, third) = (raw(1), raw(2));
    assert!(second[1].contains("Ship the parser"), "{second:?}");
    assert_eq!(second[..], third[..second.len()], "the prefix sent is byte-stable");

    // And a turn that changes the instructions under the lock is refused, as for any session
    let changed = json!({"model": "mock-model", "instructions": "Be verbose.", "input": "d", "previous_response_id": id});
    let refused = post(changed).await.unwrap();
    assert_eq!(refused.status(), 409);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"]["code"], "goal_locked");
}

#[tokio::test]
async fn a_long_agent_chain_is_compressed_in_epochs_behind_a_stable_prefix() {
    // Given compression with a window the chain outgrows, and a model that calls `run` each turn
    let mut upstream = Server::builder();
    for n in 0..TURNS {
        let mut completion = weather_call(&format!("call_{n}"));
        completion["choices"][0]["message"]["tool_calls"][0]["function"] =
            json!({"name": "run", "arguments": format!("{{\"n\":{n}}}")});
        upstream = upstream.chat(completion);
    }
    let h = Harness::builder().upstream(upstream).config(|c| rules_within(c, WINDOW)).start().await;
    // When an agent answers each call with a long, coloured tool output, chained by id
    run_agent_chain(&h, "mock-model", TURNS, WINDOW, |n, r| {
        assert_eq!(r["output"][0]["call_id"], format!("call_{n}"))
    })
    .await;

    // Then the chain compacted, and every turn but an epoch's extended the bytes sent before
    let requests: Vec<Vec<String>> = h
        .upstream(0)
        .requests()
        .iter()
        .map(|r| r.json()["messages"].as_array().unwrap().iter().map(Value::to_string).collect())
        .collect();
    assert_breaks_only_at_epochs(&h, &requests).await;
    // And the tool outputs lost their colours on the way
    assert!(!requests.last().unwrap().iter().any(|m| m.contains('\u{1b}')));
}

#[tokio::test]
async fn gateway_tools_run_inside_a_streamed_response() {
    // Given a gateway tool `lookup`, and a model that calls it (streamed) and then answers
    let tools = support::tool_server::ToolServer::start().await;
    let mut call: Vec<Chunk> =
        fixtures::tool_call_completion_chunks("lookup", 1).into_iter().map(Chunk::json).collect();
    call.push(Chunk::done());
    let url = tools.url("/lookup");
    let h = Harness::builder()
        .upstream(Server::builder().stream(call).stream(chunks(&["Found ", "it."], None)))
        .config(move |c| c.tools = vec![lookup_tool(url, false)])
        .start()
        .await;

    // When a streamed Responses request offers the tool
    let body = json!({"model": "mock-model", "input": "Find it.", "stream": true,
                      "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]});
    let r = create(&h.client, &h.url, body).await;
    assert_eq!(r.status(), 200);
    let events = events(&r.text().await.unwrap());

    // Then the gateway ran it between two model calls, and the client saw only the answer
    assert_eq!(tools.hits().len(), 1);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(!kinds.iter().any(|k| k.contains("function_call")), "{kinds:?}");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed", "{kinds:?}");
    assert_eq!(done["response"]["output"].as_array().unwrap().len(), 1);
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], "Found it.");
    let second = h.upstream(0).requests()[1].json();
    assert_eq!(second["messages"].as_array().unwrap().last().unwrap()["role"], "tool");
}

/// A completion whose message calls `get_weather` and `get_time` for `city`.
/// The gateway tool `lookup`, an HTTP tool at `url`; `inject`: offered to every request.
fn lookup_tool(url: String, inject: bool) -> ctxgate::config::ToolConfig {
    ctxgate::config::ToolConfig { inject, ..support::tool_server::http_tool("lookup", url) }
}

fn two_calls(city: &str) -> Value {
    let mut completion = fixtures::completion("");
    let args = json!({"city": city}).to_string();
    completion["choices"][0]["message"] = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": format!("call_w_{city}"), "type": "function", "function": {"name": "get_weather", "arguments": args}},
        {"id": format!("call_t_{city}"), "type": "function", "function": {"name": "get_time", "arguments": args}}
    ]});
    completion["choices"][0]["finish_reason"] = "tool_calls".into();
    completion
}

/// [`two_calls`] streamed: each call's first chunk with its id and name, then its arguments.
fn two_calls_streamed(city: &str) -> Vec<Chunk> {
    let args = json!({"city": city}).to_string();
    let mut chunks = Vec::new();
    for (i, (id, name)) in
        [(format!("call_w_{city}"), "get_weather"), (format!("call_t_{city}"), "get_time")].iter().enumerate()
    {
        let start =
            json!({"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": ""}});
        let rest = json!({"index": i, "function": {"arguments": args}});
        for call in [start, rest] {
            chunks.push(Chunk::json(json!({"object": "chat.completion.chunk", "model": "mock-model",
                "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]})));
        }
    }
    chunks.push(Chunk::json(fixtures::finish_chunk("tool_calls")));
    chunks.push(Chunk::done());
    chunks
}

#[tokio::test]
async fn an_openai_agents_sdk_agent_runs_its_tools_over_a_chat_only_upstream() {
    // Given a Chat-Completions upstream scripted for two agent runs (plain, then streamed), each
    // asking for both tools and then answering
    let upstream = Server::builder()
        .chat(two_calls("Paris"))
        .chat(fixtures::completion("Sunny, and noon, in Paris."))
        .stream(two_calls_streamed("Tokyo"))
        .stream(chunks(&["Sunny and ", "noon in Tokyo."], None));
    let h = Harness::builder().upstream(upstream).start().await;

    // When the Agents SDK runs its agent through the gateway, in its default Responses mode
    let seen = support::python::run_script("responses_agents.py", &h.v1(""), b"").await;

    // Then it called both tools on each run and finished with the model's answers
    assert_eq!(seen["final"], "Sunny, and noon, in Paris.");
    assert_eq!(seen["streamed_final"], "Sunny and noon in Tokyo.");
    assert_eq!(
        seen["calls"],
        json!([
            ["get_weather", "Paris"],
            ["get_time", "Paris"],
            ["get_weather", "Tokyo"],
            ["get_time", "Tokyo"]
        ])
    );
    let kinds = seen["raw_event_kinds"].as_array().unwrap();
    for kind in ["response.completed", "response.function_call_arguments.delta", "response.output_text.delta"]
    {
        assert!(kinds.contains(&json!(kind)), "{kind} in {kinds:?}");
    }

    // And the upstream was sent chat requests carrying the tools' results
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded.len(), 4);
    assert!(recorded.iter().all(|r| r.path == "/v1/chat/completions"));
    for (i, city) in [(1, "Paris"), (3, "Tokyo")] {
        let messages = recorded[i].json()["messages"].as_array().unwrap().clone();
        let results: Vec<(&str, &str)> = messages
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| (m["tool_call_id"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let (weather, time) = (format!("call_w_{city}"), format!("call_t_{city}"));
        let (sunny, noon) = (format!("sunny in {city}"), format!("noon in {city}"));
        assert!(results.contains(&(weather.as_str(), sunny.as_str())), "{results:?}");
        assert!(results.contains(&(time.as_str(), noon.as_str())), "{results:?}");
        assert_eq!(messages[0], json!({"role": "system", "content": "Answer with the tools."}));
    }
}

#[tokio::test]
async fn a_long_chain_is_rebuilt_whole_across_its_snapshots_and_past_a_deleted_response() {
    // Given a chain of 40 responses (its records hold their own part, every 16th the whole)
    let h = Harness::builder().start().await;
    let post = |body: Value| h.v1_as_client(Method::POST, "/responses").json(&body).send();
    let mut ids: Vec<String> = Vec::new();
    for n in 0..40 {
        let mut body = json!({"model": "mock-model", "input": format!("turn {n}")});
        if let Some(previous) = ids.last() {
            body["previous_response_id"] = json!(previous);
        }
        let r: Value = post(body).await.unwrap().json().await.unwrap();
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    // When a response in the middle is deleted, and the chain continues from its last response
    // and forks from one past the first snapshot
    let deleted = h.v1_as_client(Method::DELETE, &format!("/responses/{}", ids[20])).send().await.unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(
        post(json!({"model": "mock-model", "input": "last", "previous_response_id": ids[39]}))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post(json!({"model": "mock-model", "input": "fork", "previous_response_id": ids[17]}))
            .await
            .unwrap()
            .status(),
        200
    );

    // Then each was sent its whole conversation, in order
    let expected = |turns: usize, last: &str| -> Vec<Value> {
        let mut messages: Vec<Value> = (0..turns)
            .flat_map(|n| [user(&format!("turn {n}")), assistant("Hello from mock-upstream.")])
            .collect();
        messages.push(user(last));
        messages
    };
    let recorded = h.upstream(0).requests();
    assert_eq!(recorded.len(), 42);
    let sent = |i: usize| -> Vec<Value> { recorded[i].json()["messages"].as_array().unwrap().clone() };
    assert_eq!(sent(40), expected(40, "last"));
    assert_eq!(sent(41), expected(18, "fork"));
    // And the deleted response itself is gone
    let got = h.v1_as_client(Method::GET, &format!("/responses/{}", ids[20])).send().await.unwrap();
    assert_eq!(got.status(), 404);
}

#[tokio::test]
async fn a_chain_outlives_the_ttl_of_its_first_response() {
    // Given a short TTL, and a chain whose second response comes after half of it
    const TTL: std::time::Duration = std::time::Duration::from_secs(4);
    let h = Harness::builder().config(|c| c.sessions.ttl = TTL).start().await;
    let post = |body: Value| h.v1_as_client(Method::POST, "/responses").json(&body).send();
    let started = tokio::time::Instant::now();
    let r0: Value =
        post(json!({"model": "mock-model", "input": "zero"})).await.unwrap().json().await.unwrap();
    let id = |r: &Value| r["id"].as_str().unwrap().to_string();
    // (time passing is what this test is about: the TTL runs on the wall clock)
    tokio::time::sleep_until(started + TTL / 2 + std::time::Duration::from_millis(200)).await;
    let r1: Value = post(json!({"model": "mock-model", "input": "one", "previous_response_id": id(&r0)}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r2: Value = post(json!({"model": "mock-model", "input": "two", "previous_response_id": id(&r1)}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // When the first response has expired
    let deadline = started + TTL * 2;
    loop {
        let got = h.v1_as_client(Method::GET, &format!("/responses/{}", id(&r0))).send().await.unwrap();
        if got.status() == 404 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the first response never expired");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Then the chain still continues from its latest response, with its whole conversation
    let r3 = post(json!({"model": "mock-model", "input": "three", "previous_response_id": id(&r2)}))
        .await
        .unwrap();
    assert_eq!(r3.status(), 200);
    let sent = h.upstream(0).requests().last().unwrap().json();
    let reply = assistant("Hello from mock-upstream.");
    assert_eq!(
        sent["messages"],
        json!([user("zero"), reply, user("one"), reply, user("two"), reply, user("three")])
    );
}

#[tokio::test]
async fn official_python_sdk_runs_background_responses() {
    // Given a Chat-Completions upstream scripted in the order the SDK script calls it: an
    // answer, a streamed answer, another answer, and one that takes far longer than the test
    let upstream = Server::builder()
        .chat(fixtures::completion("Done in the background."))
        .stream(chunks(&["resumed ", "stream ", "works"], None))
        .chat(fixtures::completion("Now."))
        .reply(Reply::json(200, fixtures::completion("Too late.")).delay(std::time::Duration::from_secs(60)));
    let h = Harness::builder().upstream(upstream).start().await;

    // When the SDK script runs against the gateway
    let seen = support::python::run_script("responses_background_sdk.py", &h.v1(""), b"").await;

    // Then `responses.create(background=True)` returned at once, queued, and polling with
    // `responses.retrieve` saw it complete
    let polled = &seen["polled"];
    assert_eq!(polled["created_status"], "queued", "{polled}");
    assert_eq!(polled["background"], true);
    assert_eq!(polled["statuses"].as_array().unwrap().last().unwrap(), "completed", "{polled}");
    assert_eq!(polled["text"], "Done in the background.");
    // And `responses.retrieve(id, stream=True, starting_after=N)` gave the SDK the events after N,
    // numbered on from it, to `response.completed`
    let resumed = &seen["resumed"];
    let last_seen = resumed["last_seen"].as_u64().unwrap();
    assert_eq!(resumed["first_part"][0], "response.created", "{resumed}");
    let numbers: Vec<u64> =
        resumed["numbers"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
    assert_eq!(numbers, (last_seen + 1..last_seen + 1 + numbers.len() as u64).collect::<Vec<_>>());
    assert_eq!(resumed["rest"].as_array().unwrap().last().unwrap(), "response.completed", "{resumed}");
    assert_eq!(resumed["text"], "resumed stream works");
    // And `responses.cancel` cancelled the running one, which stays cancelled
    assert_eq!(seen["cancelled"], json!({"status": "cancelled", "retrieved": "cancelled", "output": 0}));
    // And a response created without background cannot be cancelled
    assert_eq!(seen["foreground_cancel"]["status"], 400, "{seen}");
    assert_eq!(seen["foreground_cancel"]["message"], "Cannot cancel a synchronous response.");
    assert_eq!(seen["foreground_cancel"]["type"], "invalid_request_error");
}

/// What an upstream with the Responses API answers on turn `n` of an agent: its reasoning
/// (opaque, as OpenAI encrypts it), then a call to `run`.
fn reasoning_then_call(n: usize) -> Value {
    json!({
        "id": format!("resp_up{n}"), "object": "response", "created_at": 1, "status": "completed", "model": "gpt-x",
        "output": [
            {"id": format!("rs_{n}"), "type": "reasoning", "summary": [], "encrypted_content": format!("gAAAA-secret-{n}")},
            {"id": format!("fc_{n}"), "type": "function_call", "status": "completed", "call_id": format!("call_{n}"),
             "name": "run", "arguments": format!("{{\"n\":{n}}}")}
        ],
        "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}
    })
}

/// A long tool output with colours, as a build prints it.
fn coloured_output(n: usize) -> String {
    (0..60).map(|l| format!("\u{1b}[32mok\u{1b}[0m   step {n} line {l}:    value {}\n", l * n)).collect()
}

/// Locks the goal "Ship the parser" on session `id`.
async fn lock_goal(h: &Harness, id: &str) {
    let goal = json!({"goal": "Ship the parser"});
    let locked =
        h.v1_as_client(Method::PUT, &format!("/sessions/{id}/goal")).json(&goal).send().await.unwrap();
    assert_eq!(locked.status(), 200);
}

/// The long agent chains' length, and the window they outgrow.
const TURNS: usize = 30;
const WINDOW: u64 = 10_000;

/// The chain compacted, and every request but an epoch's began with the one before it (each
/// request as its messages or items, serialised one by one).
async fn assert_breaks_only_at_epochs(h: &Harness, requests: &[Vec<String>]) {
    let breaks = requests.windows(2).filter(|w| !w[1].starts_with(&w[0])).count();
    let epochs = h.metric(r#"ctxgate_compression_epochs_total{model="other",stage="rules"}"#).await;
    eprintln!("{TURNS} turns: {epochs} compaction epochs, {breaks} prefix breaks");
    assert!(epochs >= 1.0, "the chain never compacted");
    assert!(breaks as f64 <= epochs, "{breaks} prefix breaks but {epochs} epochs");
}

/// Rules compression in a window of `window` tokens, the last two turns protected.
fn rules_within(c: &mut ctxgate::config::Config, window: u64) {
    c.compression.policy.mode = ctxgate::config::CompressionMode::Rules;
    c.compression.policy.context_window = window;
    c.compression.policy.keep_recent_turns = 2;
}

/// An agent's chain of `turns` turns on `model`, chained by id: "Fix the build.", then each turn
/// answers the call before it (`call_{n-1}`, to `run`) with [`coloured_output`]. Every request
/// must come back 200 within `window` tokens; `check` reads each answer. Returns the last id.
async fn run_agent_chain(
    h: &Harness,
    model: &str,
    turns: usize,
    window: u64,
    check: impl Fn(usize, &Value),
) -> String {
    let tools = json!([{"type": "function", "name": "run", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}]);
    let mut previous: Option<String> = None;
    for n in 0..turns {
        let input = match n {
            0 => json!("Fix the build."),
            _ => {
                json!([{"type": "function_call_output", "call_id": format!("call_{}", n - 1), "output": coloured_output(n)}])
            }
        };
        let mut body =
            json!({"model": model, "instructions": "You are an agent.", "input": input, "tools": tools});
        if let Some(id) = &previous {
            body["previous_response_id"] = json!(id);
        }
        let r = h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "turn {n}");
        let after: u64 = r.headers()["x-ctxgate-tokens-after"].to_str().unwrap().parse().unwrap();
        assert!(after <= window, "turn {n}: {after} tokens");
        let r: Value = r.json().await.unwrap();
        check(n, &r);
        previous = r["id"].as_str().map(str::to_string);
    }
    previous.unwrap()
}

#[tokio::test]
async fn a_long_chain_on_a_responses_upstream_is_compressed_with_its_reasoning_intact() {
    // Given an upstream with the Responses API, compression with a window the chain outgrows
    let mut upstream = Server::builder();
    for n in 0..TURNS {
        upstream = upstream.chat(reasoning_then_call(n));
    }
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| {
            c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses);
            rules_within(c, WINDOW);
        })
        .start()
        .await;
    // When an agent answers each call with a long, coloured output, chained by id
    let last_id = run_agent_chain(&h, "gpt-x", TURNS, WINDOW, |n, r| {
        assert_eq!(r, &reasoning_then_call(n), "the answer passes through as the upstream sent it")
    })
    .await;

    // Then the upstream got items, never an id it does not hold, and its instructions as sent
    let sent: Vec<Value> = h.upstream(0).requests().iter().map(|r| r.json()).collect();
    assert!(sent
        .iter()
        .all(|s| s.get("previous_response_id").is_none() && s["instructions"] == "You are an agent."));
    // (The first went as the client sent it: its input a string.)
    assert_eq!(sent[0]["input"], "Fix the build.");
    let inputs: Vec<Vec<String>> = sent[1..]
        .iter()
        .map(|s| s["input"].as_array().unwrap().iter().map(Value::to_string).collect())
        .collect();
    // And the chain compacted in epochs, every other turn extending the bytes sent before
    assert_breaks_only_at_epochs(&h, &inputs).await;
    let last = sent.last().unwrap()["input"].as_array().unwrap().clone();
    assert!(!last.iter().any(|i| i.to_string().contains('\u{1b}')), "the colours are gone");
    // And every item sent is a whole one: reasoning byte for byte, each output after its call
    let mut calls = std::collections::HashSet::new();
    for (at, item) in last.iter().enumerate() {
        match item["type"].as_str() {
            Some("reasoning") => {
                let n: usize = item["id"].as_str().unwrap()["rs_".len()..].parse().unwrap();
                assert_eq!(item, &reasoning_then_call(n)["output"][0], "reasoning rewritten");
                assert_eq!(last[at + 1]["type"], "function_call", "reasoning without its call");
            }
            Some("function_call") => {
                calls.insert(item["call_id"].as_str().unwrap().to_string());
            }
            Some("function_call_output") => {
                assert!(
                    calls.contains(item["call_id"].as_str().unwrap()),
                    "an output before its call: {item}"
                );
            }
            _ => {}
        }
    }
    // And an output compression replaced names its original, which the caller can read back
    let masked: Vec<&str> =
        last.iter().filter_map(|i| i["output"].as_str()).filter(|o| o.starts_with("[ctxgate")).collect();
    assert!(!masked.is_empty(), "no output was replaced: {last:?}");
    let id = ctxgate::compress::marker::ids_in(masked[0])[0].to_string();
    let original = h.v1_as_client(Method::GET, &format!("/ctxgate/originals/{id}")).send().await.unwrap();
    assert_eq!(original.status(), 200);
    let original: Value = original.json().await.unwrap();
    assert!(original.to_string().contains("step 1 line 59"), "{original}");
    // And the chain itself is kept whole
    let stored = h.v1_as_client(Method::GET, &format!("/responses/{last_id}/input_items")).send().await;
    assert_eq!(stored.unwrap().status(), 200);
}

#[tokio::test]
async fn a_client_resending_its_history_to_a_responses_upstream_is_compressed() {
    // Given an upstream with the Responses API and a small window
    let h = Harness::builder()
        .upstream(
            Server::builder()
                .chat(upstream_response("resp_up1", "Done."))
                .chat(upstream_response("resp_up2", "Done.")),
        )
        .config(|c| {
            c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses);
            c.compression.policy.mode = ctxgate::config::CompressionMode::Rules;
            c.compression.policy.context_window = 4_000;
            c.compression.policy.keep_recent_turns = 1;
        })
        .start()
        .await;
    // When a client (as Codex does over HTTP) sends its whole history, unstored, twice
    let mut input = vec![json!({"type": "message", "role": "user", "content": "Build it."})];
    for n in 0..12 {
        input.push(reasoning_then_call(n)["output"][0].clone());
        input.push(reasoning_then_call(n)["output"][1].clone());
        input.push(json!({"type": "function_call_output", "call_id": format!("call_{n}"), "output": coloured_output(n)}));
    }
    let body = json!({"model": "gpt-x", "input": input, "store": false});
    let first = h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ctxgate-compression"], "rules");
    let opted_out = h
        .v1_as_client(Method::POST, "/responses")
        .header("x-ctxgate-compression", "off")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(opted_out.status(), 200);

    // Then the first request went out smaller, its first message and its newest turn kept (the
    // newest output without its colours only)
    let sent: Vec<Value> = h.upstream(0).requests().iter().map(|r| r.json()).collect();
    let compressed = sent[0]["input"].as_array().unwrap();
    assert!(sent[0].to_string().len() * 2 < body.to_string().len(), "{} bytes", sent[0].to_string().len());
    assert_eq!(compressed[0], input[0]);
    let n = compressed.len();
    assert_eq!(
        compressed[n - 3..n - 1],
        input[input.len() - 3..input.len() - 1],
        "reasoning and call as sent"
    );
    let newest = compressed[n - 1]["output"].as_str().unwrap();
    assert!(newest.contains("ok step 11 line 59: value 649") && !newest.contains('\u{1b}'), "{newest}");
    // And the one that opted out went as the client sent it
    assert_eq!(sent[1], body);
    assert!(h.upstream(0).requests()[1].headers.get("x-ctxgate-compression").is_none());
}

const SECRET: &str = "the vault code is 4417-ALPHA";

/// An unstored history whose oldest, largest output holds the secret.
fn vault_history() -> Value {
    let big: String = (0..400)
        .map(|l| if l == 250 { format!("{SECRET}\n") } else { format!("log line {l}: nothing to see\n") })
        .collect();
    let mut input = vec![
        json!({"type": "message", "role": "user", "content": "Audit the vault."}),
        json!({"type": "function_call", "call_id": "call_big", "name": "read_logs", "arguments": "{}"}),
        json!({"type": "function_call_output", "call_id": "call_big", "output": big}),
    ];
    for n in 0..3 {
        input.push(json!({"type": "function_call", "call_id": format!("call_{n}"), "name": "check", "arguments": "{}"}));
        input.push(json!({"type": "function_call_output", "call_id": format!("call_{n}"), "output": format!("check {n} passed")}));
    }
    input.push(json!({"type": "message", "role": "user", "content": "What is the vault code?"}));
    json!({"model": "gpt-x", "input": input, "store": false,
           "tools": [{"type": "function", "name": "check", "parameters": {"type": "object"}}]})
}

/// An upstream with the Responses API, and masking that takes the largest output of
/// [`vault_history`] (a 3,000-token window, the last turn protected).
fn masking_only(c: &mut ctxgate::config::Config) {
    c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses);
    c.compression.policy.mode = ctxgate::config::CompressionMode::Rules;
    c.compression.policy.context_window = 3_000;
    c.compression.policy.keep_recent_turns = 1;
    c.compression.policy.rules =
        ctxgate::config::RulesConfig { mask_old_tool_results: true, ..ctxgate::config::RulesConfig::none() };
}

/// A round that reasons, then calls `ctxgate_expand` for `id`.
fn expanding(id: &str) -> Value {
    json!({"id": "resp_b", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-x",
           "output": [
               {"id": "rs_b", "type": "reasoning", "summary": [], "encrypted_content": "gAAAA-b"},
               {"id": "fc_b", "type": "function_call", "status": "completed", "call_id": "call_x", "name": "ctxgate_expand",
                "arguments": json!({"id": id, "query": "vault code"}).to_string()}],
           "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 5, "total_tokens": 15}})
}

/// `object`'s stream, as an upstream with the Responses API sends it.
fn stream_of(object: &Value) -> Vec<Chunk> {
    let mut events = vec![
        json!({"type": "response.created", "response": {"id": object["id"], "status": "in_progress", "output": []}}),
    ];
    for (i, item) in object["output"].as_array().unwrap().iter().enumerate() {
        events.push(json!({"type": "response.output_item.added", "output_index": i, "item": item}));
        if let Some(text) = item.pointer("/content/0/text") {
            events.push(json!({"type": "response.output_text.delta", "output_index": i, "content_index": 0, "delta": text}));
        }
        if let Some(arguments) = item.get("arguments") {
            events.push(json!({"type": "response.function_call_arguments.delta", "output_index": i, "delta": arguments}));
        }
        events.push(json!({"type": "response.output_item.done", "output_index": i, "item": item}));
    }
    events.push(json!({"type": "response.completed", "response": object}));
    events
        .into_iter()
        .enumerate()
        .map(|(n, mut e)| {
            e["sequence_number"] = json!(n);
            Chunk::json(e)
        })
        .collect()
}

#[tokio::test]
async fn a_model_on_a_responses_upstream_reads_a_masked_output_back_through_ctxgate_expand() {
    // Given an upstream with the Responses API, and masking that takes the largest output
    let h = Harness::builder().upstream(Server::builder()).config(masking_only).start().await;
    let upstream = h.upstream(0);
    let post = || h.v1_as_client(Method::POST, "/responses").json(&vault_history()).send();

    // When the history first goes out, the secret is masked and the tool is offered last
    upstream.push(Reply::json(200, upstream_response("resp_a", "I cannot tell.")));
    assert_eq!(post().await.unwrap().status(), 200);
    let first = upstream.requests()[0].json();
    let names: Vec<&str> =
        first["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["check", "ctxgate_expand"]);
    assert!(!first.to_string().contains(SECRET), "the secret was masked");
    let masked = first["input"][2]["output"].as_str().unwrap();
    let id = ctxgate::compress::marker::ids_in(masked)[0].to_string();

    // And when the model calls ctxgate_expand for it (as JSON), then answers
    upstream.push(Reply::json(200, expanding(&id)));
    upstream.push(Reply::json(200, upstream_response("resp_c", "4417-ALPHA")));
    let answered: Value = post().await.unwrap().json().await.unwrap();

    // Then the gateway answered the call and asked again; the client sees one response without it
    let asked = upstream.requests()[2].json();
    let input = asked["input"].as_array().unwrap();
    let n = input.len();
    assert_eq!(input[n - 3]["encrypted_content"], "gAAAA-b", "the round's reasoning goes back with its call");
    assert_eq!(input[n - 2]["name"], "ctxgate_expand");
    assert_eq!(input[n - 1]["call_id"], "call_x");
    assert!(input[n - 1]["output"].as_str().unwrap().contains(SECRET), "{}", input[n - 1]);
    assert_eq!(answered["id"], "resp_c");
    assert_eq!(answered["output"], upstream_response("resp_c", "4417-ALPHA")["output"]);
    assert_eq!(answered["usage"]["input_tokens"], 13, "the rounds' usage, summed");

    // And streamed, the client gets one response's events, numbered from 0, without the call
    upstream.push(Reply::sse(stream_of(&expanding(&id))));
    upstream.push(Reply::sse(stream_of(&upstream_response("resp_d", "4417-ALPHA"))));
    let mut body = vault_history();
    body["stream"] = json!(true);
    let text =
        h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap().text().await.unwrap();
    let events = events(&text);
    assert!(!text.contains("ctxgate_expand") && !text.contains("rs_b"), "the round leaked: {text}");
    let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.output_item.added",
            "response.output_text.delta",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(events[1]["output_index"], 0);
    let done = &events[4]["response"];
    assert_eq!(
        (done["id"].as_str(), &done["output"]),
        (Some("resp_d"), &upstream_response("resp_d", "4417-ALPHA")["output"])
    );
    assert_eq!(done["usage"]["input_tokens"], 13);
    assert_eq!(upstream.requests().len(), 5);
    // And both calls are in the tool metrics, as on a chat upstream
    assert_eq!(h.metric(r#"ctxgate_tool_calls_total{tool="ctxgate_expand",outcome="ok"}"#).await, 2.0);

    // And a background response, which runs out of the gateway's sight, is compressed but offered
    // no tool the gateway would have to answer, and is no turn of the session it names
    let mut queued = upstream_response("resp_bg", "");
    queued["status"] = json!("queued");
    upstream.push(Reply::json(200, queued));
    let mut body = vault_history();
    body["background"] = json!(true);
    body["store"] = json!(true);
    let r =
        h.v1_as_client(Method::POST, "/responses").header("x-session-id", "s-bg").json(&body).send().await;
    assert_eq!(r.unwrap().status(), 200);
    let sent = upstream.requests()[5].json();
    assert!(!sent.to_string().contains(SECRET), "{sent}");
    assert_eq!(sent["tools"], vault_history()["tools"], "only the client's tools");
    let session = h.v1_as_client(Method::GET, "/sessions/s-bg/messages").send().await.unwrap();
    assert_eq!(session.status(), 404);
}

#[tokio::test]
async fn a_turn_on_a_responses_upstream_runs_on_its_session_with_the_goal_lock() {
    // Given an upstream with the Responses API, and a session with a locked goal
    let upstream = Server::builder().chat(upstream_response("resp_up1", "Answer 1."));
    let h = Harness::builder()
        .upstream(upstream)
        .config(|c| c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses))
        .start()
        .await;
    lock_goal(&h, "s-native").await;
    let post = |body: Value| {
        h.v1_as_client(Method::POST, "/responses").header("x-session-id", "s-native").json(&body).send()
    };

    // When two turns of a chain name the session, the second streamed
    let r1 = post(json!({"model": "gpt-x", "instructions": "Be terse.", "input": "a"})).await.unwrap();
    assert_eq!(r1.status(), 200);
    assert!(r1.headers().contains_key("x-ctxgate-session-version"), "{:?}", r1.headers());
    assert_eq!(r1.json::<Value>().await.unwrap(), upstream_response("resp_up1", "Answer 1."));
    let stream = vec![
        Chunk::json(
            json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up2", "status": "in_progress"}}),
        ),
        Chunk::json(
            json!({"type": "response.completed", "sequence_number": 1, "response": upstream_response("resp_up2", "Answer 2.")}),
        ),
    ];
    h.upstream(0).push(Reply::sse(stream));
    let r2 = post(json!({"model": "gpt-x", "instructions": "Be terse.", "input": "b", "previous_response_id": "resp_up1", "stream": true}))
        .await
        .unwrap();
    assert!(r2.headers().contains_key("x-ctxgate-session-version"));
    assert!(r2.text().await.unwrap().contains("response.completed"));

    // Then each went out with the goal block first, in the same bytes
    let inputs: Vec<Value> = h.upstream(0).requests().iter().map(|r| r.json()["input"].clone()).collect();
    assert!(inputs[0][0]["content"].as_str().unwrap().contains("Ship the parser"), "{}", inputs[0]);
    assert_eq!(inputs[0][0]["role"], "system");
    assert_eq!(inputs[0][0], inputs[1][0]);
    assert_eq!(inputs[1][1], json!({"type": "message", "role": "user", "content": "a"}));
    assert!(h.upstream(0).requests().iter().all(|r| !r.headers.contains_key("x-session-id")));

    // And the session holds both turns, committed before the client saw them complete
    let transcript = h.v1_as_client(Method::GET, "/sessions/s-native/messages").send().await.unwrap();
    let transcript: Value = transcript.json().await.unwrap();
    let texts: Vec<String> = transcript["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{}:{}", m["role"].as_str().unwrap(), m["content"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(texts, ["system:Be terse.", "user:a", "assistant:Answer 1.", "user:b", "assistant:Answer 2."]);

    // And a turn that changes the instructions under the lock is refused, before the upstream
    let refused = post(json!({"model": "gpt-x", "instructions": "Be verbose.", "input": "c"})).await.unwrap();
    assert_eq!(refused.status(), 409);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"]["code"], "goal_locked");
    assert_eq!(h.upstream(0).requests().len(), 2);
}

#[tokio::test]
async fn a_session_turn_to_a_responses_upstream_commits_after_its_client_leaves() {
    // Given an upstream with the Responses API that answers slowly
    let slow =
        Reply::json(200, upstream_response("resp_slow", "Late answer.")).delay(Duration::from_millis(600));
    let h = Harness::builder()
        .upstream(Server::builder().reply(slow))
        .config(|c| c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses))
        .start()
        .await;

    // When the client gives up before the answer
    let gone = h
        .v1_as_client(Method::POST, "/responses")
        .header("x-session-id", "s-left")
        .timeout(Duration::from_millis(150))
        .json(&json!({"model": "gpt-x", "input": "a"}))
        .send()
        .await;
    assert!(gone.is_err(), "the client was meant to time out");

    // Then the turn still ends and commits, and the session is free at once
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let transcript = h.v1_as_client(Method::GET, "/sessions/s-left/messages").send().await.unwrap();
        if transcript.status() == 200 {
            let transcript: Value = transcript.json().await.unwrap();
            if transcript["data"].as_array().is_some_and(|d| d.len() == 2) {
                assert_eq!(transcript["data"][1]["content"], "Late answer.");
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the turn was not committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.upstream(0).push(Reply::json(200, upstream_response("resp_next", "Next.")));
    let next = h
        .v1_as_client(Method::POST, "/responses")
        .header("x-session-id", "s-left")
        .timeout(Duration::from_secs(5))
        .json(&json!({"model": "gpt-x", "input": "b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
}

#[tokio::test]
async fn each_expand_round_is_charged_to_the_callers_tokens_per_minute() {
    // Given a gateway key with a token limit, in front of an upstream with the Responses API
    let h = Harness::builder()
        .upstream(Server::builder())
        .config(|c| {
            c.upstreams[0].keyless = true;
            let mut agent = support::key("agent", "sk-agent");
            agent.tokens_per_minute = std::num::NonZeroU32::new(1_000_000);
            c.auth.keys = vec![agent];
            masking_only(c);
        })
        .start()
        .await;
    let upstream = h.upstream(0);
    let post = || h.client.post(h.v1("/responses")).bearer_auth("sk-agent").json(&vault_history()).send();
    let estimated = r#"ctxgate_rate_limit_tokens_total{key="agent",kind="estimated"}"#;
    upstream.push(Reply::json(200, upstream_response("resp_a", "I cannot tell.")));
    assert_eq!(post().await.unwrap().status(), 200);
    let one = h.metric(estimated).await;
    let masked = upstream.requests()[0].json()["input"][2]["output"].as_str().unwrap().to_string();
    let id = ctxgate::compress::marker::ids_in(&masked)[0].to_string();

    // When the same request makes the model expand once
    upstream.push(Reply::json(200, expanding(&id)));
    upstream.push(Reply::json(200, upstream_response("resp_c", "4417-ALPHA")));
    assert_eq!(post().await.unwrap().status(), 200);

    // Then both of its upstream calls were charged: the second carries the original too
    let two = h.metric(estimated).await - one;
    assert!(two > 2.0 * one, "one request charged {one}, the one with a round {two}");
}

/// A Responses round calling the gateway tool `lookup`.
fn calling_lookup() -> Value {
    json!({"id": "resp_l", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-x",
           "output": [{"id": "fc_l", "type": "function_call", "status": "completed", "call_id": "call_l",
                       "name": "lookup", "arguments": "{\"q\":\"vault\"}"}],
           "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}})
}

#[tokio::test]
async fn gateway_tools_run_between_rounds_on_a_responses_upstream() {
    // Given an injected gateway tool and an upstream with the Responses API
    let tools = support::tool_server::ToolServer::start().await;
    let url = tools.url("/lookup");
    let h = Harness::builder()
        .upstream(Server::builder())
        .config(move |c| {
            c.upstreams[0].api = Some(ctxgate::config::UpstreamApi::Responses);
            c.tools = vec![lookup_tool(url, true)];
        })
        .start()
        .await;
    let upstream = h.upstream(0);
    let client_tools = json!([{"type": "function", "name": "check", "parameters": {"type": "object"}}]);

    // When the model calls it, then answers (as JSON, then streamed)
    upstream.push(Reply::json(200, calling_lookup()));
    upstream.push(Reply::json(200, upstream_response("resp_f", "Found it.")));
    let body = json!({"model": "gpt-x", "input": "Find it.", "tools": client_tools, "store": false});
    let answered: Value =
        h.v1_as_client(Method::POST, "/responses").json(&body).send().await.unwrap().json().await.unwrap();
    upstream.push(Reply::sse(stream_of(&calling_lookup())));
    upstream.push(Reply::sse(stream_of(&upstream_response("resp_g", "Found it."))));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = h
        .v1_as_client(Method::POST, "/responses")
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Then the tool was offered after the client's own, in the flat shape
    let first = upstream.requests()[0].json();
    let names: Vec<&str> =
        first["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["check", "lookup"]);
    // And the gateway ran it between two model calls, each time, with its result as the call's output
    assert_eq!(tools.hits().len(), 2);
    let second = upstream.requests()[1].json();
    let input = second["input"].as_array().unwrap();
    assert_eq!(input[input.len() - 2]["name"], "lookup");
    assert_eq!(input[input.len() - 1]["call_id"], "call_l");
    assert!(!input[input.len() - 1]["output"].as_str().unwrap().is_empty());
    // And the client saw only the answer, with the rounds' usage
    assert_eq!(answered["output"], upstream_response("resp_f", "Found it.")["output"]);
    assert_eq!(answered["usage"]["input_tokens"], 8);
    assert!(!text.contains("call_l"), "the call leaked: {text}");
    let events = events(&text);
    assert_eq!(
        events.last().unwrap()["response"]["output"],
        upstream_response("resp_g", "Found it.")["output"]
    );
}
