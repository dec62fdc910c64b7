//! Request parsing never panics: arbitrary bytes, arbitrary JSON, and valid requests with one
//! field set to an arbitrary value all give Ok or a 4xx naming what is wrong.

use glm_server::api::{parse, Endpoint, Limits};
use proptest::prelude::*;
use serde_json::{json, Value};

const ENDPOINTS: [Endpoint; 3] = [Endpoint::Completions, Endpoint::Chat, Endpoint::Infill];
const FIELDS: [&str; 24] = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "echo",
    "n",
    "best_of",
    "logprobs",
    "top_logprobs",
    "suffix",
    "presence_penalty",
    "logit_bias",
    "tools",
    "tool_choice",
    "response_format",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|u| json!(u)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        Just(json!("[MASK]")),
        Just(json!("a [gMASK]")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()).prop_map(str::to_string), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn check(ep: Endpoint, body: &[u8]) {
    match parse(ep, body, &Limits { max_tokens: 512, max_n: 8, max_choices: 64, chat_template: Default::default() }) {
        Ok(p) => {
            assert!(p.sampling.max_new_tokens <= 512);
            assert!(p.sampling.min_new_tokens <= p.sampling.max_new_tokens);
            assert!(p.sampling.validate().is_ok());
            assert!((1..=8).contains(&p.n));
        }
        Err(e) => {
            assert!((400..500).contains(&e.status), "{e:?}");
            assert!(!e.message.is_empty());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..256), ep in 0usize..3) {
        check(ENDPOINTS[ep], &body);
    }

    #[test]
    fn arbitrary_json(v in any_json(), ep in 0usize..3) {
        check(ENDPOINTS[ep], v.to_string().as_bytes());
    }

    #[test]
    fn one_field_of_a_valid_request_set_to_anything(field in prop::sample::select(FIELDS.to_vec()), v in any_json(), ep in 0usize..3) {
        let mut body = json!({"model": "tiny", "prompt": "Hello [MASK]", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
        body[field] = v;
        check(ENDPOINTS[ep], body.to_string().as_bytes());
    }
}

#[test]
fn valid_requests_parse() {
    let l = Limits { max_tokens: 512, max_n: 8, max_choices: 64, chat_template: Default::default() };
    let p = parse(
        Endpoint::Completions,
        br#"{"model":"m","prompt":["Hi"],"max_tokens":5.0,"temperature":0,"stop":"\n","seed":-1}"#,
        &l,
    );
    let p = p.expect("valid");
    assert_eq!(p.sampling.max_new_tokens, 5);
    // A batch of prompts: one task each, within prompts x n <= max_choices.
    let batch = parse(Endpoint::Completions, br#"{"model":"m","prompt":["a","b","c"],"n":2}"#, &l).expect("batch");
    assert_eq!((batch.tasks.len(), batch.n), (3, 2));
    let over = Limits { max_choices: 5, ..l };
    let e = parse(Endpoint::Completions, br#"{"model":"m","prompt":["a","b","c"],"n":2}"#, &over).err();
    assert!(e.is_some_and(|e| e.status == 400 && e.message.contains("6 choices")));
    assert!(p.sampling.is_greedy() && p.seeded && p.stops == vec!["\n".to_string()]);
    let p = parse(
        Endpoint::Chat,
        br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#,
        &l,
    );
    let p = p.expect("valid chat");
    assert_eq!(p.sampling.max_new_tokens, 512);
    assert!(p.stops.contains(&glm_infer::CHAT_STOP.to_string()));
}
