//! `POST /v1/responses/compact` answered by ctxgate's own compaction in front of a
//! Chat-Completions-only upstream: a long conversation comes back under the budget as plain
//! Responses items with markers whose originals resolve byte for byte, the same every time and
//! the same as the chat pipeline sends upstream; a short one comes back as it was; a stored
//! chain compacts from its `previous_response_id` (on both stores); the next turn, sent the
//! compacted items, offers `ctxgate_expand` and answers it from the caller's store; errors in
//! OpenAI's shape and the gateway key's model list; the official `openai` Python SDK parses the
//! answer with its own types; a route with only Responses upstreams gets the request as sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod support;

use ctxgate::compress::marker;
use ctxgate::config::{CompressionMode, Config, RouteConfig, RulesConfig, UpstreamApi};
use mock_upstream::Server;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use support::gateway::AUTH;
use support::stores::{Store, StoreUrl};
use support::{fixtures, Harness};

const SECRET: &str = "the vault code is 4417-ALPHA";
const INSTRUCTIONS: &str = "You are an agent.";
const WINDOW: u64 = 4_500;

/// Masking only, so which result goes (the largest) is known.
fn policy(c: &mut Config) {
    c.compression.policy.mode = CompressionMode::Rules;
    c.compression.policy.context_window = WINDOW;
    c.compression.policy.keep_recent_turns = 1;
    c.compression.policy.rules = RulesConfig { mask_old_tool_results: true, ..RulesConfig::none() };
}

/// The low-water mark the compaction targets.
fn budget() -> u64 {
    let mut config = Config::default();
    policy(&mut config);
    config.compression.policy.low_tokens()
}

/// The big tool result, holding the secret.
fn big() -> String {
    (0..400)
        .map(|l| if l == 250 { format!("{SECRET}\n") } else { format!("log line {l}: nothing to see\n") })
        .collect()
}

/// An agent conversation as Responses items, whose largest (and oldest) tool result is over
/// the budget on its own.
fn long_conversation() -> Vec<Value> {
    let mut items = vec![
        json!({"type": "message", "role": "user", "content": "Audit the vault."}),
        json!({"type": "function_call", "call_id": "call_big", "name": "read_logs", "arguments": "{}"}),
        json!({"type": "function_call_output", "call_id": "call_big", "output": big()}),
    ];
    for n in 0..3 {
        let call_id = format!("call_{n}");
        items.push(json!({"type": "function_call", "call_id": call_id, "name": "check", "arguments": format!("{{\"n\":{n}}}")}));
        items.push(json!({"type": "function_call_output", "call_id": call_id, "output": format!("check {n} passed")}));
    }
    items.push(json!({"type": "message", "role": "user", "content": "What is the vault code?"}));
    items
}

/// The same conversation as Chat Completions messages, behind the instructions.
fn long_messages() -> Vec<Value> {
    let mut messages = vec![
        json!({"role": "system", "content": INSTRUCTIONS}),
        json!({"role": "user", "content": "Audit the vault."}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_big", "type": "function", "function": {"name": "read_logs", "arguments": "{}"}}]}),
        json!({"role": "tool", "tool_call_id": "call_big", "content": big()}),
    ];
    for n in 0..3 {
        let id = format!("call_{n}");
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function", "function": {"name": "check", "arguments": format!("{{\"n\":{n}}}")}}]}));
        messages.push(json!({"role": "tool", "tool_call_id": id, "content": format!("check {n} passed")}));
    }
    messages.push(json!({"role": "user", "content": "What is the vault code?"}));
    messages
}

/// The marker id of the big result: its chat message's bytes, as the gateway derives them.
fn big_id() -> String {
    let message = json!({"role": "tool", "tool_call_id": "call_big", "content": big()});
    marker::id_of(&RawValue::from_string(message.to_string()).unwrap())
}

async fn start(upstream: mock_upstream::Builder) -> Harness {
    Harness::builder().upstream(upstream).config(policy).start().await
}

/// A gateway on `store` (the guard keeps a Redis server alive).
async fn start_on(store: Store, upstream: mock_upstream::Builder) -> (Harness, StoreUrl) {
    let store = store.url().await;
    let url = store.url.clone();
    let h = Harness::builder()
        .upstream(upstream)
        .config(move |c| {
            policy(c);
            c.sessions.store = url;
        })
        .start()
        .await;
    (h, store)
}

async fn post(h: &Harness, path: &str, auth: &str, body: &Value) -> reqwest::Response {
    h.client.post(h.v1(path)).header("authorization", auth).json(body).send().await.unwrap()
}

async fn compact(h: &Harness, body: &Value) -> (reqwest::header::HeaderMap, Value) {
    let response = post(h, "/responses/compact", AUTH, body).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    (headers, response.json().await.unwrap())
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> u64 {
    headers[name].to_str().unwrap().parse().unwrap()
}

async fn a_long_conversation_comes_back_under_the_budget_with_originals_that_resolve(store: Store) {
    // Given a conversation over the budget, and an upstream that must not be called
    let (h, _store) = start_on(store, Server::builder()).await;
    let body = json!({"model": "mock-model", "instructions": INSTRUCTIONS, "input": long_conversation()});

    // When it is compacted
    let (headers, compacted) = compact(&h, &body).await;

    // Then it is a compaction object whose token counts went from over to under the budget
    assert_eq!(compacted["object"], "response.compaction");
    assert!(compacted["id"].as_str().unwrap().starts_with("resp_"));
    assert!(compacted["created_at"].as_u64().unwrap() > 0);
    assert_eq!(headers["x-ctxgate-compression"], "rules");
    let (before, after) =
        (header(&headers, "x-ctxgate-tokens-before"), header(&headers, "x-ctxgate-tokens-after"));
    assert!(before > budget() && after <= budget(), "{before} -> {after}, budget {}", budget());
    assert_eq!(compacted["usage"]["input_tokens"], before);
    assert!(h.upstream(0).requests().is_empty(), "no model call");

    // And the items are the conversation's, in order, without the instructions, the big
    // result replaced by a marker and the rest as sent
    let output = compacted["output"].as_array().unwrap();
    let kinds: Vec<&str> = output.iter().map(|i| i["type"].as_str().unwrap()).collect();
    let conversation = long_conversation();
    let sent: Vec<&str> = conversation.iter().map(|i| i["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, sent);
    assert_eq!(output[0]["content"], json!([{"type": "input_text", "text": "Audit the vault."}]));
    assert_eq!(output[1]["call_id"], "call_big");
    assert_eq!(output[4]["output"], "check 0 passed");
    assert!(!compacted.to_string().contains(SECRET), "the secret was masked");
    let masked = output[2]["output"].as_str().unwrap();
    assert!(masked.starts_with(marker::PREFIX), "{masked}");

    // And the marker's original resolves byte for byte for this caller, and for no other
    let ids = marker::ids_in(masked);
    assert_eq!(ids.len(), 1, "{masked}");
    let get = |auth: &'static str| {
        h.client.get(h.v1(&format!("/ctxgate/originals/{}", ids[0]))).header("authorization", auth).send()
    };
    let original = get(AUTH).await.unwrap();
    assert_eq!(original.status(), 200);
    let original: Value = original.json().await.unwrap();
    assert_eq!(original["message"]["role"], "tool");
    assert_eq!(original["message"]["tool_call_id"], "call_big");
    assert_eq!(original["message"]["content"].as_str().unwrap(), big());
    assert_eq!(get("Bearer sk-someone-else").await.unwrap().status(), 404);
}

#[tokio::test]
async fn compacting_twice_gives_the_same_items_the_chat_pipeline_sends_upstream() {
    // Given an upstream for one chat request and one Responses request
    let h = start(Server::builder().chat(fixtures::completion("a")).chat(fixtures::completion("b"))).await;
    let body = json!({"model": "mock-model", "instructions": INSTRUCTIONS, "input": long_conversation()});

    // When the conversation is compacted twice
    let (_, first) = compact(&h, &body).await;
    let (_, second) = compact(&h, &body).await;

    // Then the items are byte for byte the same
    assert_eq!(first["output"].to_string(), second["output"].to_string());
    assert_ne!(first["id"], second["id"], "each compaction is its own object");

    // And they are what the chat pipeline sends upstream for the same conversation: the
    // conversation as a chat request, and the compacted items as the next Responses input
    let chat = json!({"model": "mock-model", "messages": long_messages()});
    assert_eq!(post(&h, "/chat/completions", AUTH, &chat).await.status(), 200);
    let next = json!({"model": "mock-model", "instructions": INSTRUCTIONS, "input": first["output"], "store": false});
    assert_eq!(post(&h, "/responses", AUTH, &next).await.status(), 200);
    let requests = h.upstream(0).requests();
    let (by_chat, by_items) = (requests[0].json(), requests[1].json());
    assert!(by_chat["messages"].to_string().contains(marker::PREFIX), "the chat request was compacted");
    assert_eq!(by_items["messages"], by_chat["messages"]);
}

#[tokio::test]
async fn a_short_conversation_comes_back_as_it_was() {
    let h = start(Server::builder()).await;
    let input = json!([
        {"type": "message", "role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_w", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_w", "output": "sunny, 21 C"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"type": "message", "role": "user", "content": "And tomorrow?"},
    ]);

    let (headers, compacted) = compact(&h, &json!({"model": "mock-model", "input": input})).await;

    assert_eq!(header(&headers, "x-ctxgate-tokens-before"), header(&headers, "x-ctxgate-tokens-after"));
    let output = compacted["output"].as_array().unwrap();
    assert_eq!(output.len(), 5);
    assert_eq!(
        output[0]["content"],
        json!([{"type": "input_text", "text": "What is the weather in Paris?"}])
    );
    assert_eq!(output[0]["role"], "user");
    for field in ["call_id", "name", "arguments"] {
        assert_eq!(output[1][field], input[1][field]);
    }
    assert_eq!(output[2]["output"], "sunny, 21 C");
    assert_eq!(
        (&output[3]["role"], &output[3]["content"][0]["text"]),
        (&json!("assistant"), &json!("It is sunny."))
    );
    assert_eq!(output[4]["content"][0]["text"], "And tomorrow?");
    assert!(!compacted.to_string().contains(marker::PREFIX));
}

#[tokio::test]
async fn with_compression_off_for_the_model_the_conversation_comes_back_as_it_was() {
    let h = Harness::builder()
        .config(|c| {
            policy(c);
            c.compression.policy.mode = CompressionMode::Off;
        })
        .start()
        .await;

    let (headers, compacted) =
        compact(&h, &json!({"model": "mock-model", "input": long_conversation()})).await;

    assert_eq!(headers["x-ctxgate-compression"], "off");
    assert!(header(&headers, "x-ctxgate-tokens-after") > budget());
    assert_eq!(compacted["output"][2]["output"].as_str().unwrap(), big());
}

async fn a_stored_chain_is_compacted_from_its_previous_response_id(store: Store) {
    // Given a stored response whose conversation is the long one and its answer
    let (h, _store) =
        start_on(store, Server::builder().chat(fixtures::completion("It is 4417-ALPHA."))).await;
    let first = json!({"model": "mock-model", "instructions": INSTRUCTIONS, "input": long_conversation()});
    let created = post(&h, "/responses", AUTH, &first).await;
    assert_eq!(created.status(), 200);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    // When the chain is compacted with one more message
    let body = json!({"model": "mock-model", "previous_response_id": id, "input": "Rotate it."});
    let (headers, compacted) = compact(&h, &body).await;

    // Then the stored conversation, its answer and the new message come back, compacted
    assert!(header(&headers, "x-ctxgate-tokens-after") <= budget());
    let output = compacted["output"].as_array().unwrap();
    assert_eq!(output.len(), long_conversation().len() + 2);
    assert_eq!(output[0]["content"][0]["text"], "Audit the vault.");
    assert!(output[2]["output"].as_str().unwrap().starts_with(marker::PREFIX));
    let answer = &output[output.len() - 2];
    assert_eq!(
        (&answer["role"], &answer["content"][0]["text"]),
        (&json!("assistant"), &json!("It is 4417-ALPHA."))
    );
    assert_eq!(output[output.len() - 1]["content"], json!([{"type": "input_text", "text": "Rotate it."}]));
    assert_eq!(h.upstream(0).requests().len(), 1, "only the stored turn called the model");

    // And the chain alone compacts too, without input
    let (_, alone) = compact(&h, &json!({"model": "mock-model", "previous_response_id": id})).await;
    assert_eq!(alone["output"].as_array().unwrap().len(), long_conversation().len() + 1);
}

on_both_stores!(
    a_long_conversation_comes_back_under_the_budget_with_originals_that_resolve,
    a_stored_chain_is_compacted_from_its_previous_response_id
);

#[tokio::test]
async fn an_unknown_or_another_callers_previous_response_id_is_not_found() {
    let h = start(Server::builder().chat(fixtures::completion("Noted."))).await;
    let created = post(&h, "/responses", AUTH, &json!({"model": "mock-model", "input": "Remember 7."})).await;
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    for (auth, id) in
        [(AUTH, "resp_0000000000000000000000000000dead"), ("Bearer sk-someone-else", id.as_str())]
    {
        let body = json!({"model": "mock-model", "previous_response_id": id, "input": "more"});
        let response = post(&h, "/responses/compact", auth, &body).await;
        assert_eq!(response.status(), 404, "{auth} {id}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "response_not_found");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn a_malformed_body_is_a_400_naming_the_field() {
    let h = start(Server::builder()).await;
    let cases = [
        (json!({"input": "hi"}), Some("model")),
        (json!({"model": "mock-model", "input": 7}), Some("input")),
        (json!({"model": "mock-model"}), Some("input")),
        (
            json!({"model": "mock-model", "input": "hi", "previous_response_id": 7}),
            Some("previous_response_id"),
        ),
        (json!({"model": "mock-model", "input": "hi", "instructions": ["x"]}), Some("instructions")),
        (
            json!({"model": "mock-model", "input": [{"type": "message", "role": "robot", "content": "x"}]}),
            Some("input"),
        ),
        (json!(["not", "an", "object"]), None),
    ];
    for (body, param) in cases {
        let response = post(&h, "/responses/compact", AUTH, &body).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(error["error"]["param"].as_str(), param, "{body}");
    }
}

#[tokio::test]
async fn a_key_compacts_only_for_the_models_it_may_use() {
    let h = Harness::builder()
        .config(|c| {
            policy(c);
            let mut key = support::key("team-b", "sk-team-b");
            key.models = vec!["gpt-4o*".into()];
            c.auth.keys = vec![key];
            c.upstreams.iter_mut().for_each(|u| u.keyless = true);
        })
        .start()
        .await;

    let refused =
        post(&h, "/responses/compact", "Bearer sk-team-b", &json!({"model": "mock-model", "input": "hi"}))
            .await;
    let allowed =
        post(&h, "/responses/compact", "Bearer sk-team-b", &json!({"model": "gpt-4o-mini", "input": "hi"}))
            .await;

    assert_eq!(refused.status(), 403);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"]["code"], "model_not_allowed");
    assert_eq!(allowed.status(), 200);
}

#[tokio::test]
async fn a_route_with_only_responses_upstreams_gets_the_request_as_sent() {
    // Given a model routed to an upstream with the Responses API, and the rest to a chat one
    let theirs = json!({"id": "cmp_theirs", "object": "response.compaction", "created_at": 1, "output": [], "usage": {}});
    let h = Harness::builder()
        .upstream(Server::builder())
        .upstream(Server::builder().chat(theirs.clone()))
        .config(|c| {
            policy(c);
            c.upstreams[1].api = Some(UpstreamApi::Responses);
            c.routes = vec![
                RouteConfig { models: vec!["native-model".into()], upstreams: vec!["u1".into()] },
                RouteConfig { models: vec!["*".into()], upstreams: vec!["u0".into()] },
            ];
        })
        .start()
        .await;

    // When each model asks for a compaction
    let native = json!({"model": "native-model", "input": "hi", "prompt_cache_key": "k", "future_field": 1});
    let response = post(&h, "/responses/compact", AUTH, &native).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap(), theirs);
    let (_, ours) = compact(&h, &json!({"model": "mock-model", "input": "hi"})).await;

    // Then the native one went upstream as sent, and the chat one was answered by the gateway
    let recorded = h.upstream(1).requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].path, "/v1/responses/compact");
    assert_eq!(recorded[0].json(), native);
    assert_eq!(ours["object"], "response.compaction");
    assert!(h.upstream(0).requests().is_empty());
}

#[tokio::test]
async fn official_python_sdk_parses_a_compaction_and_continues_from_it() {
    // Given a chat upstream for the turn that continues from the compacted items
    let h = start(Server::builder().chat(fixtures::completion("It was masked."))).await;

    // When the SDK script compacts the long conversation and sends its output as input
    let input = serde_json::to_vec(&long_conversation()).unwrap();
    let seen = support::python::run_script("responses_compact_sdk.py", &h.v1(""), &input).await;

    // Then the SDK built its own CompactedResponse with the items' types
    assert_eq!(seen["class"], "CompactedResponse");
    assert_eq!(seen["object"], "response.compaction");
    assert!(seen["input_tokens"].as_u64().unwrap() > budget());
    let types: Vec<&str> = seen["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"message"));
    assert_eq!(types.iter().filter(|t| **t == "function_call_output").count(), 4);
    assert!(seen["masked"].as_str().unwrap().starts_with(marker::PREFIX));
    assert_eq!(seen["next_text"], "It was masked.");

    // And the turn after it sent the compacted conversation and the new message upstream
    let sent = h.upstream(0).requests()[0].json();
    let messages = sent["messages"].as_array().unwrap();
    assert!(messages[3]["content"].as_str().unwrap().starts_with(marker::PREFIX), "{:.300}", messages[3]);
    assert_eq!(messages.last().unwrap()["content"], "Summarise the audit.");
    assert!(!sent.to_string().contains(SECRET));
}

/// A `ctxgate_expand` call of the marker, then an answer.
fn expand_then_answer(id: &str) -> [Value; 2] {
    let mut call = fixtures::completion("");
    call["choices"][0]["message"] = json!({"role": "assistant", "content": null, "tool_calls": [{
        "id": "call_x", "type": "function",
        "function": {"name": "ctxgate_expand", "arguments": json!({"id": id}).to_string()}}]});
    call["choices"][0]["finish_reason"] = "tool_calls".into();
    [call, fixtures::completion("4417-ALPHA")]
}

#[tokio::test]
async fn the_turn_after_a_compaction_offers_ctxgate_expand_for_its_markers() {
    // Given a model that expands the marker on each next turn, and a compacted conversation
    let [call, answer] = expand_then_answer(&big_id());
    let h = start(Server::builder().chat(call.clone()).chat(answer.clone()).chat(call).chat(answer)).await;
    let body = json!({"model": "mock-model", "instructions": INSTRUCTIONS, "input": long_conversation()});
    let (_, compacted) = compact(&h, &body).await;
    assert_eq!(marker::ids_in(compacted["output"][2]["output"].as_str().unwrap()), [big_id()]);

    // When the compacted items are the next turn's input: stored (a session), and not stored
    let mut input = compacted["output"].as_array().unwrap().clone();
    input.push(json!({"role": "user", "content": "What is the vault code?"}));
    for store in [true, false] {
        let next =
            json!({"model": "mock-model", "instructions": INSTRUCTIONS, "input": input, "store": store});
        let response = post(&h, "/responses", AUTH, &next).await;
        assert_eq!(response.status(), 200, "store: {store}");
        let answered: Value = response.json().await.unwrap();

        // Then the model was offered the tool, and its call was answered from the caller's store
        assert_eq!(answered["output"][0]["content"][0]["text"], "4417-ALPHA", "store: {store}");
    }
    let requests = h.upstream(0).requests();
    assert_eq!(requests.len(), 4);
    for pair in requests.chunks(2) {
        let offered = pair[0].json()["tools"].to_string();
        assert!(offered.contains("ctxgate_expand"), "{offered}");
        let after = pair[1].json();
        let last = after["messages"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["role"], "tool");
        assert!(last["content"].as_str().unwrap().contains(SECRET), "{last}");
    }
}
