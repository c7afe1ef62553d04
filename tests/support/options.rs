//! Configuration of a test [`super::RedisServer`].

/// Options for a private test `redis-server`. Defaults:
/// AOF on with `appendfsync always`, keyspace notifications `KEA`,
/// CONFIG enabled, DEBUG disabled, no extra lines.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `appendonly yes` + `appendfsync always` (so a restart keeps every acked
    /// write). Default `true`. `false` => `appendonly no` (data lost on restart).
    pub appendonly: bool,
    /// Value for `notify-keyspace-events`. Default `Some("KEA")`.
    /// `None` leaves the Redis default (off, `""`).
    pub notifications: Option<String>,
    /// `true` => `rename-command CONFIG ""` (CONFIG then fails with
    /// "unknown command"). Default `false`.
    pub config_disabled: bool,
    /// `true` => `enable-debug-command yes`. Default `false`.
    pub debug_command: bool,
    /// Extra `name value` config lines, appended after the defaults; the value
    /// is written verbatim (an empty value is written as `""`). A name
    /// that matches a default directive (`save`, `appendonly`, `appendfsync`,
    /// `notify-keyspace-events`, `enable-debug-command`) replaces that default.
    /// `port`, `bind`, `dir`, `logfile`, `daemonize` are owned by the harness
    /// and rejected (panic).
    pub extra: Vec<(String, String)>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            appendonly: true,
            notifications: Some("KEA".into()),
            config_disabled: false,
            debug_command: false,
            extra: Vec::new(),
        }
    }
}

impl RedisOptions {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn appendonly(mut self, on: bool) -> Self {
        self.appendonly = on;
        self
    }

    pub fn notifications(mut self, flags: Option<&str>) -> Self {
        self.notifications = flags.map(str::to_owned);
        self
    }

    pub fn config_disabled(mut self, disabled: bool) -> Self {
        self.config_disabled = disabled;
        self
    }

    pub fn debug_command(mut self, enabled: bool) -> Self {
        self.debug_command = enabled;
        self
    }

    pub fn extra(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Renders the redis.conf for the given port and directory.
    pub(crate) fn render_conf(&self, port: u16, dir: &std::path::Path) -> String {
        const RESERVED: [&str; 5] = ["port", "bind", "dir", "logfile", "daemonize"];
        for (name, _) in &self.extra {
            if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name.trim())) {
                panic!("RedisOptions::extra: `{name}` is managed by the test harness and cannot be overridden");
            }
        }
        let overridden = |name: &str| {
            self.extra
                .iter()
                .any(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        };

        let mut lines: Vec<(String, String)> = vec![
            ("bind".into(), "127.0.0.1".into()),
            ("port".into(), port.to_string()),
            ("daemonize".into(), "no".into()),
            ("dir".into(), dir.display().to_string()),
            (
                "logfile".into(),
                dir.join("redis.log").display().to_string(),
            ),
        ];
        let mut defaults: Vec<(&str, String)> = vec![("save", String::new())];
        if self.appendonly {
            defaults.push(("appendonly", "yes".into()));
            defaults.push(("appendfsync", "always".into()));
        } else {
            defaults.push(("appendonly", "no".into()));
        }
        if let Some(flags) = &self.notifications {
            defaults.push(("notify-keyspace-events", flags.clone()));
        }
        if self.debug_command {
            defaults.push(("enable-debug-command", "yes".into()));
        }
        for (name, value) in defaults {
            if !overridden(name) {
                lines.push((name.into(), value));
            }
        }
        let mut conf = String::new();
        for (name, value) in &lines {
            conf.push_str(name);
            conf.push(' ');
            conf.push_str(&quote(value));
            conf.push('\n');
        }
        // Extra values are written verbatim (the caller quotes if needed, e.g.
        // `extra("rename-command", "FLUSHALL \"\"")`); only "" becomes `""`.
        for (name, value) in &self.extra {
            let value = if value.is_empty() {
                "\"\""
            } else {
                value.as_str()
            };
            conf.push_str(&format!("{} {value}\n", name.trim()));
        }
        if self.config_disabled {
            // rename-command only works from a config file.
            conf.push_str("rename-command CONFIG \"\"\n");
        }
        conf
    }
}

/// Quotes a config value for redis.conf (sdssplitargs syntax) when needed.
fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && c != '"' && c != '\'' && c != '\\' && !c.is_control());
    if plain {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
