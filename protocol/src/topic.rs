//! Topic-name rules, which consumer-group names follow too.
//!
//! A name is 1–249 characters from `[a-zA-Z0-9._-]`, and neither `.` nor
//! `..` (they would be confusing as directory names in tooling).

/// The longest topic name accepted.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicNameError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is {0} characters, the limit is {MAX_TOPIC_NAME_LEN}")]
    TooLong(usize),
    #[error("topic name may not be '.' or '..'")]
    Dots,
    #[error("topic name contains {0:?}; allowed are letters, digits, '.', '_' and '-'")]
    BadChar(char),
}

/// Checks a consumer group's name: the topic-name rules, with errors that
/// say "group name".
pub fn validate_group_name(name: &str) -> Result<(), String> {
    validate_topic_name(name).map_err(|e| e.to_string().replacen("topic name", "group name", 1))
}

/// Checks `name` against the topic-name rules.
pub fn validate_topic_name(name: &str) -> Result<(), TopicNameError> {
    if name.is_empty() {
        return Err(TopicNameError::Empty);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TopicNameError::BadChar(c));
    }
    // All characters are ASCII from here on, so bytes == characters.
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err(TopicNameError::TooLong(name.len()));
    }
    if name == "." || name == ".." {
        return Err(TopicNameError::Dots);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for n in [
            "a",
            "orders",
            "orders.v2",
            "a_b-c.D9",
            &"x".repeat(249),
            "...",
        ] {
            assert_eq!(validate_topic_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn rejects_invalid_names() {
        assert_eq!(validate_topic_name(""), Err(TopicNameError::Empty));
        assert_eq!(
            validate_group_name("a/b"),
            Err("group name contains '/'; allowed are letters, digits, '.', '_' and '-'".into())
        );
        assert_eq!(validate_group_name("workers-1"), Ok(()));
        assert_eq!(validate_topic_name("."), Err(TopicNameError::Dots));
        assert_eq!(validate_topic_name(".."), Err(TopicNameError::Dots));
        assert_eq!(
            validate_topic_name(&"x".repeat(250)),
            Err(TopicNameError::TooLong(250))
        );
        assert_eq!(
            validate_topic_name("a b"),
            Err(TopicNameError::BadChar(' '))
        );
        assert_eq!(
            validate_topic_name("a/b"),
            Err(TopicNameError::BadChar('/'))
        );
        assert_eq!(validate_topic_name("é"), Err(TopicNameError::BadChar('é')));
    }
}
