//! Every file under config/ parses and validates, so the examples cannot rot.

use std::collections::BTreeMap;

use ctxgate::config::Config;

#[test]
fn every_config_file_is_valid() {
    // The examples name their key variables; give them values as an operator would.
    let env: BTreeMap<String, String> = ["OPENAI_API_KEY", "BACKUP_API_KEY"]
        .iter()
        .map(|k| (k.to_string(), "sk-example".to_string()))
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(err) = Config::load(Some(&path), &env) {
                panic!("{}:\n{err}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "expected the example configs, found {checked}");
}

#[test]
fn the_default_config_passes_the_client_key_through_to_openai() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ctxgate.toml");
    let config = Config::load(Some(&path), &BTreeMap::new()).unwrap();
    assert_eq!(config.upstreams[0].base_url, "https://api.openai.com/v1");
    assert_eq!(config.upstreams[0].api_key_env, None);
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
}
