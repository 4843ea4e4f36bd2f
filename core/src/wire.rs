//! Enums that travel as strings (in `/status`, on the console line, in state files): one
//! declaration gives the variant, its exact wire text, `as_str` and `Display`, so code matches
//! on variants and the wire format stays what operators and tests read.

/// Declares an enum carried on the wire as the given strings.
#[macro_export]
macro_rules! wire_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $($(#[$vm])* #[serde(rename = $text)] $variant),+
        }
        impl $name {
            /// The wire text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::wire_enum! {
        enum Colour { Light = "light", DarkBlue = "dark-blue" }
    }

    #[test]
    fn variants_travel_as_their_text() {
        assert_eq!(serde_json::to_string(&Colour::DarkBlue).unwrap(), "\"dark-blue\"");
        assert_eq!(serde_json::from_str::<Colour>("\"light\"").unwrap(), Colour::Light);
        assert_eq!(Colour::DarkBlue.to_string(), "dark-blue");
        assert!(serde_json::from_str::<Colour>("\"Light\"").is_err());
    }
}
