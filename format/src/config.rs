//! The image's runtime configuration, as `cimg pack` stores it (FORMAT.md: the config blob):
//! the part of an OCI or Docker image config that a container runtime uses. This type is the
//! one owner of that JSON: the importers make it, `cimg info` shows it, `launch` reads it.
//!
//! Stored as a JSON object with the keys that are set, in alphabetical order (`Cmd`,
//! `Entrypoint`, `Env`, `User`, `WorkingDir`), so the same config gives the same bytes.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// An image's runtime configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `Cmd`: the default arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `Entrypoint`: the default program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `Env`: `NAME=VALUE` strings, to be set literally.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `User`: the user to run as, as the image names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `WorkingDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

impl ImageConfig {
    /// The stored config, if it is one (a config of another shape is no config: the image
    /// was packed by something else, and its runtime settings are not known).
    pub fn parse(json: &[u8]) -> Option<ImageConfig> {
        serde_json::from_slice(json).ok()
    }

    /// The runtime part of an OCI or Docker image config (`config` or `Config` of the
    /// config blob), keeping only well-typed fields; `None` if nothing is set.
    pub fn from_image_config(cfg: &Value) -> Option<ImageConfig> {
        let c = cfg.get("config").or_else(|| cfg.get("Config"))?;
        let strings = |k: &str| -> Option<Vec<String>> {
            let a = c.get(k)?.as_array()?;
            Some(
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect(),
            )
        };
        let string = |k: &str| c.get(k)?.as_str().map(str::to_string);
        let out = ImageConfig {
            cmd: strings("Cmd"),
            entrypoint: strings("Entrypoint"),
            env: strings("Env").unwrap_or_default(),
            user: string("User"),
            working_dir: string("WorkingDir"),
        };
        (out != ImageConfig::default()).then_some(out)
    }

    /// The JSON to store.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and lists of strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `WorkingDir` if it is an absolute path (a relative one has nothing to be relative to).
    pub fn working_dir(&self) -> Option<&Path> {
        self.working_dir
            .as_deref()
            .filter(|w| w.starts_with('/'))
            .map(Path::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_part_of_an_oci_config_round_trips() {
        let oci: Value = serde_json::from_str(
            r#"{"architecture":"amd64","config":{"Env":["PATH=/bin","A=b=c"],
                "WorkingDir":"/work","Cmd":["sh"],"User":"1000","Labels":{"x":"y"},
                "Entrypoint":null}}"#,
        )
        .unwrap();
        let c = ImageConfig::from_image_config(&oci).unwrap();
        assert_eq!(c.env, ["PATH=/bin", "A=b=c"]);
        assert_eq!(c.working_dir(), Some(Path::new("/work")));
        assert_eq!(c.entrypoint, None);
        let json = c.to_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"Cmd":["sh"],"Env":["PATH=/bin","A=b=c"],"User":"1000","WorkingDir":"/work"}"#
        );
        assert_eq!(ImageConfig::parse(&json), Some(c));
    }

    #[test]
    fn odd_configs() {
        assert_eq!(ImageConfig::parse(b"not json"), None);
        let rel = ImageConfig::parse(br#"{"WorkingDir":"rel"}"#).unwrap();
        assert_eq!(rel.working_dir(), None);
        let none: Value = serde_json::from_str(r#"{"config":{"Labels":{}}}"#).unwrap();
        assert_eq!(ImageConfig::from_image_config(&none), None);
        // Ill-typed fields of a foreign config are dropped, not stored.
        let odd: Value = serde_json::from_str(r#"{"Config":{"Env":"X=1","User":7}}"#).unwrap();
        assert_eq!(ImageConfig::from_image_config(&odd), None);
    }
}
