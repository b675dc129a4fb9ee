//! Removes secret-bearing fields from rows before they are archived or shown.

use serde_json::Value;

/// Replacement for a redacted value.
pub const REDACTED: &str = "***redacted***";

/// Whether a column name suggests it holds a secret (connection strings, SAS, keys, passwords).
pub fn is_secret_field(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "connectionstring",
        "sas",
        "secret",
        "password",
        "token",
        "credential",
        "apikey",
        "accesskey",
        "signature",
    ]
    .iter()
    .any(|w| n.contains(w))
        || n.ends_with("key") && !n.ends_with("primarykey")
}

/// Markers of a secret inside a value, whatever its column is called (compared lower-case):
/// storage and Service Bus connection strings, SAS query strings, passwords in connection
/// strings, bearer tokens and PEM private keys.
const SECRET_MARKERS: [&str; 12] = [
    "accountkey=",
    "sharedaccesskey=",
    "sharedaccesssignature=",
    "sig=",
    "password=",
    "pwd=",
    "client_secret=",
    "clientsecret=",
    "secret=",
    "access_token=",
    "bearer ",
    "private key-----",
];

/// Whether a value carries a secret, whatever the column is called.
pub fn is_secret_value(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|m| v.contains(m))
}

/// Redacts secret-bearing fields and values (recursively) and drops OData annotations other
/// than the etag.
pub fn redact_row(row: &Value) -> Value {
    match row {
        Value::String(s) if is_secret_value(s) => Value::String(REDACTED.into()),
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with("@odata.") || k.as_str() == "@odata.etag")
                .map(|(k, v)| {
                    let v = if is_secret_field(k) && !v.is_null() {
                        Value::String(REDACTED.into())
                    } else {
                        redact_row(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact_row).collect()),
        other => other.clone(),
    }
}

/// Text that came from a server (OData messages, organisation names, URLs), made safe for a
/// terminal or a log line: every control character, newlines and escape codes included, is
/// shown escaped, so a server cannot colour, move the cursor or forge a line.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    #[test]
    fn server_text_loses_its_control_characters() {
        assert_eq!(
            printable("org\u{1b}[31mprod\r\nok"),
            "org\\u{1b}[31mprod\\r\\nok"
        );
        assert_eq!(printable("Contoso Ltd — UAT"), "Contoso Ltd — UAT");
    }

    #[test]
    fn connection_strings_and_keys_are_redacted() {
        let row = json!({
            "ProjectName": "Customers V3",
            "ServiceBusConnectionString": "Endpoint=sb://x;SharedAccessKey=abc",
            "StorageAccountSASConnectionString": "sv=2020&sig=xyz",
            "nested": {"ApiKey": "k"},
            "@odata.context": "drop me",
            "ExternalEnvironmentUrl": "https://org.crm.dynamics.com"
        });
        let out = redact_row(&row);
        let text = out.to_string();
        assert!(
            !text.contains("abc") && !text.contains("xyz") && !text.contains("\"k\""),
            "{text}"
        );
        assert!(!text.contains("@odata.context"));
        assert_eq!(out["ProjectName"], "Customers V3");
        assert_eq!(
            out["ExternalEnvironmentUrl"],
            "https://org.crm.dynamics.com"
        );
    }

    #[test]
    fn secrets_in_innocent_columns_are_redacted_by_their_value() {
        let row = json!({
            "msdyn_name": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=S3cr3t==",
            "Notes": "https://x.blob.core.windows.net/c?sv=2022&SIG=abc%3D",
            "Description": "Server=db;User Id=sa;Password=hunter2;",
            "Header": "Bearer eyJ0eXAi",
            "list": ["plain", "-----BEGIN RSA PRIVATE KEY-----\nMIIE"],
            "Status": "Active",
            "ExternalEnvironmentUrl": "https://org.crm.dynamics.com/?signature_version=2",
        });
        let out = redact_row(&row);
        let text = out.to_string();
        for secret in ["S3cr3t", "abc%3D", "hunter2", "eyJ0eXAi", "MIIE"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(out["Status"], "Active");
        assert_eq!(out["list"][0], "plain");
        assert_eq!(
            out["ExternalEnvironmentUrl"],
            "https://org.crm.dynamics.com/?signature_version=2"
        );
    }
}
