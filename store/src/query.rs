//! Operator queries: filter expressions, sort keys and limits over alerts.
//!
//! This is the language behind `tandem alerts --filter/--sort/--limit` and the store's answer to
//! a [`Query`]. The CLI parses a filter and sort spec itself so that a typo is reported with a
//! caret before anything is sent; the store parses the filter again, because a query may come
//! from any client.
//!
//! # Filter grammar
//!
//! ```text
//! expr       := or
//! or         := and ("or" and)*
//! and        := not ("and" not)*
//! not        := "not" not | primary
//! primary    := "(" expr ")" | comparison
//! comparison := FIELD OP LITERAL
//! OP         := "=" | "==" | "!=" | "<" | "<=" | ">" | ">=" | "~"
//! ```
//!
//! Keywords are case-insensitive. `~` is "contains" and works on text only. A `LITERAL` is a
//! double-quoted string (escapes `\"`, `\\`, `\n`, `\t`), an integer (possibly negative),
//! `true`/`false`, or a bare word such as `web1`, `major` or `10.0.0.1`, which is text. A
//! `FIELD` is an [`Alert`] field name (everything but `journal`) or `extra.KEY`; a missing extra
//! key reads as the empty string.
//!
//! Every comparison is type-checked when the filter is parsed, so a filter that parses cannot
//! fail on an alert: numbers (`serial`, `server_serial`, `first_occurrence`, `last_occurrence`,
//! `state_change`, `tally`, `expire_seconds`, `severity`) compare numerically, `severity` also
//! takes its names (`severity >= major`), `kind` takes `problem`, `resolution` or `information`
//! and `acknowledged` takes `true` or `false` (both with `=` and `!=` only), and text compares
//! byte-wise. An empty filter matches every alert.
//!
//! # Sorting
//!
//! A sort spec is a comma-separated list of fields, `-` in front for descending:
//! `-severity,last_occurrence`. The sort is stable; without keys alerts come in serial order.

use std::cmp::Ordering;
use std::fmt;

use tandem_protocol::{Alert, Kind, Query, Severity, SortKey};

/// How deep `(` and `not` may nest: the parser recurses, and a filter can arrive from any
/// client, so an absurdly nested one must be refused rather than exhaust the stack.
const MAX_DEPTH: usize = 64;

/// A filter or sort spec that could not be parsed, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", At(*column))]
pub struct FilterError {
    /// 1-based column, in characters, of the offending input; the end of the input is one past
    /// its last character. 0 when the error is not in a text (a sort key received in a
    /// [`Query`]).
    pub column: usize,
    pub message: String,
}

/// The `column N: ` prefix of a [`FilterError`], absent for errors without a position.
struct At(usize);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            Ok(())
        } else {
            write!(f, "column {}: ", self.0)
        }
    }
}

impl FilterError {
    fn new(column: usize, message: impl Into<String>) -> Self {
        FilterError {
            column,
            message: message.into(),
        }
    }

    /// The message, the input and a caret under the column, on three lines.
    ///
    /// Control characters in the input are shown as spaces so that the caret, which counts one
    /// column per character, stays under the right one.
    pub fn render(&self, input: &str) -> String {
        if self.column == 0 {
            return self.message.clone();
        }
        let line: String = input
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!(
            "{}\n{}\n{}^",
            self.message,
            line,
            " ".repeat(self.column - 1)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Fields

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextColumn {
    Identifier,
    ServerName,
    Node,
    NodeAlias,
    Manager,
    Agent,
    AlertGroup,
    AlertKey,
    Summary,
    Class,
    Owner,
}

impl TextColumn {
    fn get(self, alert: &Alert) -> &str {
        match self {
            TextColumn::Identifier => &alert.identifier,
            TextColumn::ServerName => &alert.server_name,
            TextColumn::Node => &alert.node,
            TextColumn::NodeAlias => &alert.node_alias,
            TextColumn::Manager => &alert.manager,
            TextColumn::Agent => &alert.agent,
            TextColumn::AlertGroup => &alert.alert_group,
            TextColumn::AlertKey => &alert.alert_key,
            TextColumn::Summary => &alert.summary,
            TextColumn::Class => &alert.class,
            TextColumn::Owner => &alert.owner,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumberColumn {
    Serial,
    ServerSerial,
    Severity,
    FirstOccurrence,
    LastOccurrence,
    StateChange,
    Tally,
    ExpireSeconds,
}

impl NumberColumn {
    /// i128 holds every u64 and i64 exactly, so one comparison serves all numeric fields.
    fn get(self, alert: &Alert) -> i128 {
        match self {
            NumberColumn::Serial => alert.serial.into(),
            NumberColumn::ServerSerial => alert.server_serial.into(),
            NumberColumn::Severity => alert.severity.get().into(),
            NumberColumn::FirstOccurrence => alert.first_occurrence.into(),
            NumberColumn::LastOccurrence => alert.last_occurrence.into(),
            NumberColumn::StateChange => alert.state_change.into(),
            NumberColumn::Tally => alert.tally.into(),
            NumberColumn::ExpireSeconds => alert.expire_seconds.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Text(TextColumn),
    Number(NumberColumn),
    Kind,
    Acknowledged,
}

/// The names the language knows, in the order of the [`Alert`] struct (which is also the order
/// error messages list them in).
const COLUMNS: [(&str, Column); 21] = [
    ("identifier", Column::Text(TextColumn::Identifier)),
    ("serial", Column::Number(NumberColumn::Serial)),
    ("server_name", Column::Text(TextColumn::ServerName)),
    ("server_serial", Column::Number(NumberColumn::ServerSerial)),
    ("node", Column::Text(TextColumn::Node)),
    ("node_alias", Column::Text(TextColumn::NodeAlias)),
    ("manager", Column::Text(TextColumn::Manager)),
    ("agent", Column::Text(TextColumn::Agent)),
    ("alert_group", Column::Text(TextColumn::AlertGroup)),
    ("alert_key", Column::Text(TextColumn::AlertKey)),
    ("summary", Column::Text(TextColumn::Summary)),
    ("class", Column::Text(TextColumn::Class)),
    ("kind", Column::Kind),
    ("severity", Column::Number(NumberColumn::Severity)),
    (
        "first_occurrence",
        Column::Number(NumberColumn::FirstOccurrence),
    ),
    (
        "last_occurrence",
        Column::Number(NumberColumn::LastOccurrence),
    ),
    ("state_change", Column::Number(NumberColumn::StateChange)),
    ("tally", Column::Number(NumberColumn::Tally)),
    ("acknowledged", Column::Acknowledged),
    ("owner", Column::Text(TextColumn::Owner)),
    (
        "expire_seconds",
        Column::Number(NumberColumn::ExpireSeconds),
    ),
];

const EXTRA_PREFIX: &str = "extra.";

const KINDS: [Kind; 3] = [Kind::Problem, Kind::Resolution, Kind::Information];

/// A field a filter or a sort key refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Field {
    Column(Column),
    Extra(Box<str>),
}

impl Field {
    /// Resolves a field name written at `column`.
    fn resolve(name: &str, column: usize) -> Result<Field, FilterError> {
        if let Some(key) = strip_prefix_ignore_case(name, EXTRA_PREFIX) {
            if key.is_empty() {
                return Err(FilterError::new(
                    column + EXTRA_PREFIX.len(),
                    "expected a key after \"extra.\"",
                ));
            }
            return Ok(Field::Extra(key.into()));
        }
        if let Some((_, c)) = COLUMNS.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Ok(Field::Column(*c));
        }
        let what = if name.eq_ignore_ascii_case("journal") {
            "the journal cannot be filtered or sorted on".to_string()
        } else {
            format!("unknown field \"{}\"", clip(name))
        };
        Err(FilterError::new(
            column,
            format!("{what} (fields: {})", field_list()),
        ))
    }

    /// The canonical spelling, for sort keys sent to a store.
    fn name(&self) -> String {
        match self {
            Field::Column(c) => COLUMNS
                .iter()
                .find(|(_, col)| col == c)
                .map_or_else(String::new, |(n, _)| (*n).to_string()),
            Field::Extra(key) => format!("{EXTRA_PREFIX}{key}"),
        }
    }

    fn compare(&self, a: &Alert, b: &Alert) -> Ordering {
        match self {
            Field::Extra(key) => extra(a, key).cmp(extra(b, key)),
            Field::Column(Column::Text(c)) => c.get(a).cmp(c.get(b)),
            Field::Column(Column::Number(c)) => c.get(a).cmp(&c.get(b)),
            // By name, as operators read them.
            Field::Column(Column::Kind) => a.kind.name().cmp(b.kind.name()),
            Field::Column(Column::Acknowledged) => a.acknowledged.cmp(&b.acknowledged),
        }
    }
}

fn field_list() -> String {
    let mut list: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
    list.push("extra.KEY");
    list.join(", ")
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.get(..prefix.len())
        .filter(|head| head.eq_ignore_ascii_case(prefix))
        .and_then(|_| text.get(prefix.len()..))
}

fn extra<'a>(alert: &'a Alert, key: &str) -> &'a str {
    alert.extra.get(key).map_or("", String::as_str)
}

// ---------------------------------------------------------------------------------------------
// The compiled filter

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Cmp::Eq => ordering.is_eq(),
            Cmp::Ne => ordering.is_ne(),
            Cmp::Lt => ordering.is_lt(),
            Cmp::Le => ordering.is_le(),
            Cmp::Gt => ordering.is_gt(),
            Cmp::Ge => ordering.is_ge(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Cmp(Cmp),
    Contains,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TextSource {
    Column(TextColumn),
    Extra(Box<str>),
}

impl TextSource {
    fn get<'a>(&self, alert: &'a Alert) -> &'a str {
        match self {
            TextSource::Column(c) => c.get(alert),
            TextSource::Extra(key) => extra(alert, key),
        }
    }
}

/// A parsed filter, with every literal already converted to the type of its field so that
/// matching neither allocates nor fails.
#[derive(Clone, Debug)]
enum Node {
    All,
    Or(Vec<Node>),
    And(Vec<Node>),
    Not(Box<Node>),
    Text {
        source: TextSource,
        op: Op,
        value: Box<str>,
    },
    Number {
        column: NumberColumn,
        cmp: Cmp,
        value: i128,
    },
    Kind {
        value: Kind,
        equal: bool,
    },
    Acknowledged {
        value: bool,
        equal: bool,
    },
}

impl Node {
    fn eval(&self, alert: &Alert) -> bool {
        match self {
            Node::All => true,
            Node::Or(items) => items.iter().any(|n| n.eval(alert)),
            Node::And(items) => items.iter().all(|n| n.eval(alert)),
            Node::Not(inner) => !inner.eval(alert),
            Node::Text { source, op, value } => {
                let have = source.get(alert);
                match op {
                    Op::Cmp(cmp) => cmp.holds(have.cmp(&**value)),
                    Op::Contains => have.contains(&**value),
                }
            }
            Node::Number { column, cmp, value } => cmp.holds(column.get(alert).cmp(value)),
            Node::Kind { value, equal } => (alert.kind == *value) == *equal,
            Node::Acknowledged { value, equal } => (alert.acknowledged == *value) == *equal,
        }
    }
}

/// A parsed, type-checked filter expression.
#[derive(Clone, Debug)]
pub struct Filter {
    root: Node,
}

impl Filter {
    /// Parses a filter; an empty or blank text matches every alert.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let mut parser = Parser::new(text)?;
        if matches!(parser.tok.kind, TokKind::End) {
            return Ok(Filter { root: Node::All });
        }
        let root = parser.or(0)?;
        match parser.tok.kind {
            TokKind::End => Ok(Filter { root }),
            TokKind::RParen => Err(FilterError::new(
                parser.tok.col,
                "unmatched \")\": no \"(\" before it",
            )),
            _ => Err(parser.expected("\"and\" or \"or\"")),
        }
    }

    /// Whether the alert passes the filter.
    pub fn matches(&self, alert: &Alert) -> bool {
        self.root.eval(alert)
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Clone, Debug, PartialEq, Eq)]
enum TokKind {
    LParen,
    RParen,
    Op(Op),
    Str(String),
    /// A bare word: a field name, keyword or unquoted text; its text is the token's.
    Word,
    Int(i128),
    End,
}

#[derive(Clone, Debug)]
struct Token<'a> {
    kind: TokKind,
    /// 1-based character column of the token's first character.
    col: usize,
    /// The token as written, for messages; empty at the end.
    text: &'a str,
}

fn is_word_start(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Beyond identifier characters, those that appear in host names, addresses and paths, so that
/// `node = web-1.example.com` needs no quotes.
fn is_word_char(c: char) -> bool {
    is_word_start(c) || matches!(c, '.' | '-' | ':' | '/' | '@')
}

fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

struct Lexer<'a> {
    src: &'a str,
    /// Byte offset of the next character.
    pos: usize,
    /// Characters consumed, which is the column of the last one.
    col: usize,
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<char> {
        self.src
            .get(self.pos..)
            .and_then(|rest| rest.chars().next())
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        self.col += 1;
        Some(c)
    }

    fn eat(&mut self, want: char) -> bool {
        let found = self.peek() == Some(want);
        if found {
            self.bump();
        }
        found
    }

    fn since(&self, start: usize) -> &'a str {
        self.src.get(start..self.pos).unwrap_or("")
    }

    fn next_token(&mut self) -> Result<Token<'a>, FilterError> {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        let (start, col) = (self.pos, self.col + 1);
        let Some(c) = self.bump() else {
            return Ok(Token {
                kind: TokKind::End,
                col,
                text: "",
            });
        };
        let kind = match c {
            '(' => TokKind::LParen,
            ')' => TokKind::RParen,
            '=' => {
                self.eat('=');
                TokKind::Op(Op::Cmp(Cmp::Eq))
            }
            '!' if self.eat('=') => TokKind::Op(Op::Cmp(Cmp::Ne)),
            '<' if self.eat('=') => TokKind::Op(Op::Cmp(Cmp::Le)),
            '<' => TokKind::Op(Op::Cmp(Cmp::Lt)),
            '>' if self.eat('=') => TokKind::Op(Op::Cmp(Cmp::Ge)),
            '>' => TokKind::Op(Op::Cmp(Cmp::Gt)),
            '~' => TokKind::Op(Op::Contains),
            '"' => TokKind::Str(self.string(col)?),
            c if is_word_start(c)
                || (c == '-' && self.peek().is_some_and(|d| d.is_ascii_digit())) =>
            {
                while self.peek().is_some_and(is_word_char) {
                    self.bump();
                }
                let text = self.since(start);
                if is_integer(text) {
                    let n = text.parse().map_err(|_| {
                        FilterError::new(col, format!("the number {} is too large", clip(text)))
                    })?;
                    TokKind::Int(n)
                } else {
                    TokKind::Word
                }
            }
            other => return Err(FilterError::new(col, unexpected(other))),
        };
        Ok(Token {
            kind,
            col,
            text: self.since(start),
        })
    }

    /// The rest of a string whose opening quote, at `col`, was just consumed.
    fn string(&mut self, col: usize) -> Result<String, FilterError> {
        let mut value = String::new();
        loop {
            let here = self.col + 1;
            match self.bump() {
                None => return Err(FilterError::new(col, "unterminated string")),
                Some('"') => return Ok(value),
                Some('\\') => match self.bump() {
                    Some('"') => value.push('"'),
                    Some('\\') => value.push('\\'),
                    Some('n') => value.push('\n'),
                    Some('t') => value.push('\t'),
                    Some(other) => {
                        return Err(FilterError::new(
                            here,
                            format!(
                                "unknown escape \"\\{}\" in a string (use \\\", \\\\, \\n or \\t)",
                                other.escape_debug()
                            ),
                        ));
                    }
                    None => return Err(FilterError::new(col, "unterminated string")),
                },
                Some(c) => value.push(c),
            }
        }
    }
}

/// What to say about a character that starts no token, with the likely intent where there is
/// one.
fn unexpected(c: char) -> String {
    match c {
        '!' => "unexpected \"!\": use \"!=\" or \"not\"".to_string(),
        '&' => "unexpected \"&\": use \"and\"".to_string(),
        '|' => "unexpected \"|\": use \"or\"".to_string(),
        '\'' => "unexpected \"'\": strings use double quotes".to_string(),
        other => format!("unexpected character \"{}\"", other.escape_debug()),
    }
}

/// Long tokens are shortened in messages so that the message stays one readable line.
fn clip(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        text.to_string()
    } else {
        let head: String = text.chars().take(MAX).collect();
        format!("{head}…")
    }
}

/// A token as a message shows it.
fn describe(text: &str) -> String {
    if text.is_empty() {
        "the end of the filter".to_string()
    } else if text.starts_with('"') {
        format!("the string {}", clip(text))
    } else {
        format!("\"{}\"", clip(text))
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

fn is_keyword(word: &str) -> bool {
    ["and", "or", "not"]
        .iter()
        .any(|k| k.eq_ignore_ascii_case(word))
}

/// A literal before it is checked against its field.
enum Literal {
    Text(String),
    Int(i128),
    Bool(bool),
}

/// A comparison whose field and operator agree, waiting for its value.
enum Pending {
    Text(TextSource, Op),
    Number(NumberColumn, Cmp),
    Kind(bool),
    Acknowledged(bool),
}

impl Pending {
    /// Checks that `op` applies to `field`; `col` is the operator's.
    fn new(field: Field, name: &str, op: Op, col: usize) -> Result<Pending, FilterError> {
        let equality = match op {
            Op::Cmp(Cmp::Eq) => Some(true),
            Op::Cmp(Cmp::Ne) => Some(false),
            _ => None,
        };
        let only_equality = || format!("{name} can only be compared with \"=\" or \"!=\"");
        match field {
            Field::Extra(key) => Ok(Pending::Text(TextSource::Extra(key), op)),
            Field::Column(Column::Text(c)) => Ok(Pending::Text(TextSource::Column(c), op)),
            Field::Column(Column::Number(c)) => match op {
                Op::Cmp(cmp) => Ok(Pending::Number(c, cmp)),
                Op::Contains => Err(FilterError::new(
                    col,
                    format!("\"~\" (contains) works on text, but {name} is a number"),
                )),
            },
            Field::Column(Column::Kind) => equality
                .map(Pending::Kind)
                .ok_or_else(|| FilterError::new(col, only_equality())),
            Field::Column(Column::Acknowledged) => equality
                .map(Pending::Acknowledged)
                .ok_or_else(|| FilterError::new(col, only_equality())),
        }
    }

    /// Completes the comparison; `raw` and `col` are the literal's as written.
    fn with(
        self,
        name: &str,
        literal: Literal,
        raw: &str,
        col: usize,
    ) -> Result<Node, FilterError> {
        let wrong = |what: String| Err(FilterError::new(col, what));
        match self {
            Pending::Text(source, op) => match literal {
                Literal::Text(value) => Ok(Node::Text {
                    source,
                    op,
                    value: value.into_boxed_str(),
                }),
                Literal::Int(_) | Literal::Bool(_) => wrong(format!(
                    "{name} is text: put the value in double quotes to compare it as text, \"{}\"",
                    clip(raw)
                )),
            },
            Pending::Number(NumberColumn::Severity, cmp) => {
                let level = match &literal {
                    Literal::Int(n) => u8::try_from(*n).ok().and_then(|n| Severity::new(n).ok()),
                    Literal::Text(text) => (0..=5)
                        .filter_map(|n| Severity::new(n).ok())
                        .find(|s| s.name().eq_ignore_ascii_case(text)),
                    Literal::Bool(_) => None,
                };
                match level {
                    Some(level) => Ok(Node::Number {
                        column: NumberColumn::Severity,
                        cmp,
                        value: level.get().into(),
                    }),
                    None => wrong(format!(
                        "{name} is 0 to 5 or one of clear, indeterminate, warning, minor, major, \
                         critical, not {}",
                        describe(raw)
                    )),
                }
            }
            Pending::Number(column, cmp) => match literal {
                Literal::Int(value) => Ok(Node::Number { column, cmp, value }),
                Literal::Text(_) | Literal::Bool(_) => {
                    wrong(format!("{name} is a number, not {}", describe(raw)))
                }
            },
            Pending::Kind(equal) => {
                let kind = match &literal {
                    Literal::Text(text) => {
                        KINDS.iter().find(|k| k.name().eq_ignore_ascii_case(text))
                    }
                    Literal::Int(_) | Literal::Bool(_) => None,
                };
                match kind {
                    Some(kind) => Ok(Node::Kind {
                        value: *kind,
                        equal,
                    }),
                    None => wrong(format!(
                        "{name} is problem, resolution or information, not {}",
                        describe(raw)
                    )),
                }
            }
            Pending::Acknowledged(equal) => match literal {
                Literal::Bool(value) => Ok(Node::Acknowledged { value, equal }),
                Literal::Text(_) | Literal::Int(_) => {
                    wrong(format!("{name} is true or false, not {}", describe(raw)))
                }
            },
        }
    }
}

struct Parser<'a> {
    lexer: Lexer<'a>,
    /// The current, not yet consumed token. Tokens are lexed one at a time so that errors are
    /// reported in the order they appear in the text.
    tok: Token<'a>,
    /// The text of the last consumed token, for "after ..." in messages.
    prev: &'a str,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Result<Self, FilterError> {
        let mut lexer = Lexer {
            src,
            pos: 0,
            col: 0,
        };
        let tok = lexer.next_token()?;
        Ok(Parser {
            lexer,
            tok,
            prev: "",
        })
    }

    fn advance(&mut self) -> Result<Token<'a>, FilterError> {
        let next = self.lexer.next_token()?;
        let tok = std::mem::replace(&mut self.tok, next);
        self.prev = tok.text;
        Ok(tok)
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        self.tok.kind == TokKind::Word && self.tok.text.eq_ignore_ascii_case(keyword)
    }

    /// `expected WHAT but found TOKEN`, at the current token.
    fn expected(&self, what: &str) -> FilterError {
        FilterError::new(
            self.tok.col,
            format!("expected {what} but found {}", describe(self.tok.text)),
        )
    }

    /// `expected WHAT after PREVIOUS[ but found TOKEN]`, at the current token: for the parts of
    /// a comparison, where what came before says what is missing.
    fn expected_after(&self, what: &str) -> FilterError {
        let mut message = format!("expected {what}");
        if !self.prev.is_empty() {
            message.push_str(&format!(" after {}", describe(self.prev)));
        }
        if self.tok.kind != TokKind::End || self.prev.is_empty() {
            message.push_str(&format!(" but found {}", describe(self.tok.text)));
        }
        FilterError::new(self.tok.col, message)
    }

    fn nest(&self, depth: usize) -> Result<usize, FilterError> {
        if depth >= MAX_DEPTH {
            return Err(FilterError::new(
                self.tok.col,
                format!("too deeply nested: at most {MAX_DEPTH} levels of \"(\" and \"not\""),
            ));
        }
        Ok(depth + 1)
    }

    fn or(&mut self, depth: usize) -> Result<Node, FilterError> {
        let first = self.and(depth)?;
        if !self.at_keyword("or") {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.at_keyword("or") {
            self.advance()?;
            items.push(self.and(depth)?);
        }
        Ok(Node::Or(items))
    }

    fn and(&mut self, depth: usize) -> Result<Node, FilterError> {
        let first = self.not(depth)?;
        if !self.at_keyword("and") {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.at_keyword("and") {
            self.advance()?;
            items.push(self.not(depth)?);
        }
        Ok(Node::And(items))
    }

    fn not(&mut self, depth: usize) -> Result<Node, FilterError> {
        if self.at_keyword("not") {
            let inner = self.nest(depth)?;
            self.advance()?;
            return Ok(Node::Not(Box::new(self.not(inner)?)));
        }
        self.primary(depth)
    }

    fn primary(&mut self, depth: usize) -> Result<Node, FilterError> {
        if self.tok.kind != TokKind::LParen {
            return self.comparison();
        }
        let inner = self.nest(depth)?;
        let open = self.advance()?.col;
        let node = self.or(inner)?;
        match self.tok.kind {
            TokKind::RParen => {
                self.advance()?;
                Ok(node)
            }
            TokKind::End => Err(FilterError::new(
                self.tok.col,
                format!("expected \")\" to close the \"(\" at column {open}"),
            )),
            _ => Err(self.expected("\"and\", \"or\" or \")\"")),
        }
    }

    fn comparison(&mut self) -> Result<Node, FilterError> {
        if self.tok.kind != TokKind::Word || is_keyword(self.tok.text) {
            return Err(self.expected_after("a field name, \"not\" or \"(\""));
        }
        let name = self.tok.text;
        let field = Field::resolve(name, self.tok.col)?;
        self.advance()?;

        let TokKind::Op(op) = self.tok.kind else {
            return Err(self.expected_after("an operator (=, !=, <, <=, >, >=, ~)"));
        };
        let pending = Pending::new(field, name, op, self.tok.col)?;
        self.advance()?;

        let literal = match &mut self.tok.kind {
            TokKind::Str(text) => Literal::Text(std::mem::take(text)),
            TokKind::Int(n) => Literal::Int(*n),
            TokKind::Word if self.tok.text.eq_ignore_ascii_case("true") => Literal::Bool(true),
            TokKind::Word if self.tok.text.eq_ignore_ascii_case("false") => Literal::Bool(false),
            TokKind::Word if !is_keyword(self.tok.text) => Literal::Text(self.tok.text.to_string()),
            _ => return Err(self.expected_after("a value")),
        };
        let node = pending.with(name, literal, self.tok.text, self.tok.col)?;
        self.advance()?;
        Ok(node)
    }
}

// ---------------------------------------------------------------------------------------------
// Sorting and running

/// Parses a sort spec such as `-severity,last_occurrence`: fields separated by commas, `-` in
/// front for descending. Field names come back in their canonical spelling; a blank spec is no
/// keys.
pub fn parse_sort(spec: &str) -> Result<Vec<SortKey>, FilterError> {
    let mut keys = Vec::new();
    if spec.trim().is_empty() {
        return Ok(keys);
    }
    let leading_blanks = |s: &str| s.chars().take_while(|c| c.is_whitespace()).count();
    let mut item_col = 1;
    for item in spec.split(',') {
        let mut col = item_col + leading_blanks(item);
        let mut name = item.trim();
        let descending = match name.strip_prefix('-') {
            Some(rest) => {
                col += 1 + leading_blanks(rest);
                name = rest.trim_start();
                true
            }
            None => false,
        };
        if name.is_empty() {
            let message = if descending {
                "expected a field name after \"-\"".to_string()
            } else {
                format!(
                    "expected a field name to sort by (fields: {})",
                    field_list()
                )
            };
            return Err(FilterError::new(col, message));
        }
        keys.push(SortKey {
            field: Field::resolve(name, col)?.name(),
            descending,
        });
        item_col += item.chars().count() + 1;
    }
    Ok(keys)
}

struct SortField {
    field: Field,
    descending: bool,
}

fn compare(keys: &[SortField], a: &Alert, b: &Alert) -> Ordering {
    if keys.is_empty() {
        return a.serial.cmp(&b.serial);
    }
    for key in keys {
        let ordering = key.field.compare(a, b);
        let ordering = if key.descending {
            ordering.reverse()
        } else {
            ordering
        };
        if ordering.is_ne() {
            return ordering;
        }
    }
    Ordering::Equal
}

/// Answers a query: the matching alerts, sorted and limited, and how many matched in all.
///
/// Only the alerts returned are cloned.
pub fn run<'a>(
    alerts: impl IntoIterator<Item = &'a Alert>,
    query: &Query,
) -> Result<(Vec<Alert>, u64), FilterError> {
    let filter = Filter::parse(&query.filter)?;
    let keys = query
        .sort
        .iter()
        .map(|key| {
            // A received sort key has no text to point into: report it without a column.
            let field = Field::resolve(&key.field, 0).map_err(|e| {
                FilterError::new(
                    0,
                    format!("sort key \"{}\": {}", clip(&key.field), e.message),
                )
            })?;
            Ok(SortField {
                field,
                descending: key.descending,
            })
        })
        .collect::<Result<Vec<_>, FilterError>>()?;

    let mut hits: Vec<(usize, &Alert)> = alerts
        .into_iter()
        .filter(|alert| filter.matches(alert))
        .enumerate()
        .collect();
    let total = hits.len() as u64;

    // Ties fall back to the input position, which makes the order total: the unstable
    // selection and sort below then give exactly what a stable sort would, while only the
    // alerts kept are ever fully sorted.
    let order =
        |x: &(usize, &Alert), y: &(usize, &Alert)| compare(&keys, x.1, y.1).then(x.0.cmp(&y.0));
    let keep = query
        .limit
        .map_or(hits.len(), |l| usize::try_from(l).unwrap_or(usize::MAX))
        .min(hits.len());
    if keep < hits.len() {
        if keep > 0 {
            hits.select_nth_unstable_by(keep - 1, order);
        }
        hits.truncate(keep);
    }
    hits.sort_unstable_by(order);
    Ok((hits.into_iter().map(|(_, a)| a.clone()).collect(), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alert(serial: u64, node: &str, severity: u8) -> Alert {
        Alert {
            identifier: format!("{node}:{serial}"),
            serial,
            node: node.to_string(),
            severity: Severity::new(severity).unwrap(),
            ..Alert::default()
        }
    }

    fn matches(filter: &str, alert: &Alert) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{}", e.render(filter)))
            .matches(alert)
    }

    fn error(filter: &str) -> FilterError {
        match Filter::parse(filter) {
            Ok(f) => panic!("{filter:?} parsed as {f:?}"),
            Err(e) => e,
        }
    }

    #[track_caller]
    fn assert_error(filter: &str, column: usize, message: &str) {
        let e = error(filter);
        assert_eq!(
            (e.column, e.message.as_str()),
            (column, message),
            "{}",
            e.render(filter)
        );
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        let a = alert(1, "web1", 3);
        assert!(matches("", &a));
        assert!(matches("  \t\n ", &a));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        // a true, b true, c false: a or (b and c) holds, (a or b) and c does not.
        let a = alert(1, "web1", 3);
        let f = "node = web1 or severity = 3 and tally = 7";
        assert!(matches(f, &a));
        assert!(!matches("(node = web1 or severity = 3) and tally = 7", &a));
        // a false, b true, c false.
        assert!(!matches("node = db1 or severity = 3 and tally = 7", &a));
    }

    #[test]
    fn not_binds_tighter_than_and() {
        let a = alert(1, "web1", 3);
        assert!(!matches("not node = web1 and severity = 3", &a));
        assert!(matches("not node = db1 and severity = 3", &a));
        assert!(matches("not (node = web1 and severity = 2)", &a));
        assert!(matches("not not node = web1", &a));
        assert!(!matches("NOT Node = web1", &a));
    }

    #[test]
    fn parentheses_group() {
        let a = alert(1, "web1", 3);
        assert!(matches("((node = web1))", &a));
        assert!(matches(
            "(node = db1 or node = web1) and (severity > 2)",
            &a
        ));
        assert!(!matches("node = db1 or (node = web1 and severity > 3)", &a));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let a = alert(1, "web1", 3);
        assert!(matches("node = web1 AND severity = 3 Or tally = 1", &a));
        assert!(matches("Not node = db1", &a));
    }

    #[test]
    fn every_operator_on_numbers() {
        let a = Alert {
            tally: 5,
            ..Alert::default()
        };
        for (filter, want) in [
            ("tally = 5", true),
            ("tally == 5", true),
            ("tally = 4", false),
            ("tally != 5", false),
            ("tally != 4", true),
            ("tally < 5", false),
            ("tally < 6", true),
            ("tally <= 5", true),
            ("tally <= 4", false),
            ("tally > 4", true),
            ("tally > 5", false),
            ("tally >= 5", true),
            ("tally >= 6", false),
            ("tally>-1", true),
        ] {
            assert_eq!(matches(filter, &a), want, "{filter}");
        }
    }

    #[test]
    fn every_operator_on_text() {
        let a = Alert {
            summary: "disk /var is full".into(),
            node: "web-1.example.com".into(),
            ..Alert::default()
        };
        for (filter, want) in [
            ("node = web-1.example.com", true),
            ("node == \"web-1.example.com\"", true),
            ("node != web-1.example.com", false),
            ("node < web-2", true),
            ("node <= web-1.example.com", true),
            ("node > web", true),
            ("node >= x", false),
            ("summary ~ \"/var\"", true),
            ("summary ~ \"/VAR\"", false),
            ("summary ~ \"\"", true),
            ("summary = \"disk /var is full\"", true),
        ] {
            assert_eq!(matches(filter, &a), want, "{filter}");
        }
    }

    #[test]
    fn strings_take_escapes() {
        let a = Alert {
            summary: "say \"hi\"\\\n\tbye".into(),
            ..Alert::default()
        };
        assert!(matches(r#"summary = "say \"hi\"\\\n\tbye""#, &a));
    }

    #[test]
    fn severity_takes_numbers_and_names() {
        let a = alert(1, "web1", 4);
        for filter in [
            "severity = 4",
            "severity = major",
            "severity = MAJOR",
            "severity = \"major\"",
            "severity >= minor",
            "severity < critical",
            "severity > 0",
            "severity != clear",
        ] {
            assert!(matches(filter, &a), "{filter}");
        }
        assert!(!matches("severity >= critical", &a));
        assert!(!matches("severity = warning", &a));
    }

    #[test]
    fn kind_and_acknowledged() {
        let a = Alert {
            kind: Kind::Resolution,
            acknowledged: true,
            ..Alert::default()
        };
        assert!(matches("kind = resolution", &a));
        assert!(matches("kind != Problem", &a));
        assert!(matches("kind = \"resolution\"", &a));
        assert!(!matches("kind = information", &a));
        assert!(matches("acknowledged = true", &a));
        assert!(matches("acknowledged != FALSE", &a));
        assert!(!matches("acknowledged = false", &a));
    }

    #[test]
    fn extra_fields_and_missing_keys() {
        let mut a = alert(1, "web1", 3);
        a.extra.insert("site".into(), "ams".into());
        a.extra.insert("Rack".into(), "r12".into());
        assert!(matches("extra.site = ams", &a));
        assert!(matches("Extra.Rack ~ \"12\"", &a));
        assert!(
            !matches("extra.rack ~ \"12\"", &a),
            "keys are case-sensitive"
        );
        assert!(matches("extra.missing = \"\"", &a));
        assert!(!matches("extra.missing ~ x", &a));
    }

    #[test]
    fn every_alert_field_but_the_journal_is_known() {
        let json = serde_json::to_value(Alert::default()).unwrap();
        let fields = json.as_object().unwrap();
        for name in fields.keys() {
            match name.as_str() {
                "journal" => assert!(Field::resolve(name, 1).is_err()),
                "extra" => assert!(Field::resolve("extra.x", 1).is_ok()),
                _ => assert_eq!(Field::resolve(name, 1).map(|f| f.name()).as_ref(), Ok(name)),
            }
        }
        assert_eq!(COLUMNS.len() + 2, fields.len());
    }

    #[test]
    fn errors_point_at_the_problem() {
        assert_error(
            "sevrity >= major",
            1,
            &format!("unknown field \"sevrity\" (fields: {})", field_list()),
        );
        assert_error("severity >=", 12, "expected a value after \">=\"");
        assert_error(
            "severity >= )",
            13,
            "expected a value after \">=\" but found \")\"",
        );
        assert_error("node = \"abc", 8, "unterminated string");
        assert_error(
            "severity = 3 xyz",
            14,
            "expected \"and\" or \"or\" but found \"xyz\"",
        );
        assert_error(
            "(severity = 3 xyz)",
            15,
            "expected \"and\", \"or\" or \")\" but found \"xyz\"",
        );
        assert_error(
            "tally = \"x\"",
            9,
            "tally is a number, not the string \"x\"",
        );
        assert_error(
            "severity = 9",
            12,
            "severity is 0 to 5 or one of clear, indeterminate, warning, minor, major, critical, \
             not \"9\"",
        );
        assert_error(
            "acknowledged > 3",
            14,
            "acknowledged can only be compared with \"=\" or \"!=\"",
        );
        assert_error(
            "acknowledged = 3",
            16,
            "acknowledged is true or false, not \"3\"",
        );
        assert_error(
            "tally ~ 3",
            7,
            "\"~\" (contains) works on text, but tally is a number",
        );
        assert_error(
            "kind > problem",
            6,
            "kind can only be compared with \"=\" or \"!=\"",
        );
        assert_error(
            "kind = bad",
            8,
            "kind is problem, resolution or information, not \"bad\"",
        );
        assert_error(
            "node = 42",
            8,
            "node is text: put the value in double quotes to compare it as text, \"42\"",
        );
        assert_error(
            "(node = a",
            10,
            "expected \")\" to close the \"(\" at column 1",
        );
        assert_error("node = a)", 9, "unmatched \")\": no \"(\" before it");
        assert_error(
            "node = \"a\\qb\"",
            10,
            "unknown escape \"\\q\" in a string (use \\\", \\\\, \\n or \\t)",
        );
        assert_error(
            "severity major",
            10,
            "expected an operator (=, !=, <, <=, >, >=, ~) after \"severity\" but found \"major\"",
        );
        assert_error(
            "node = a and",
            13,
            "expected a field name, \"not\" or \"(\" after \"and\"",
        );
        assert_error(
            "and node = a",
            1,
            "expected a field name, \"not\" or \"(\" but found \"and\"",
        );
        assert_error(
            "()",
            2,
            "expected a field name, \"not\" or \"(\" after \"(\" but found \")\"",
        );
        assert_error("extra. = x", 7, "expected a key after \"extra.\"");
        assert_error("node = a && b", 10, "unexpected \"&\": use \"and\"");
        assert_error(
            "node = 'a'",
            8,
            "unexpected \"'\": strings use double quotes",
        );
        assert_error(
            "tally = 9999999999999999999999999999999999999999",
            9,
            "the number 9999999999999999999999999999999999999999 is too large",
        );
        // Columns count characters, not bytes.
        let e = error("summary ~ \"café\" and nöde = x");
        assert_eq!(
            e.column,
            22,
            "{}",
            e.render("summary ~ \"café\" and nöde = x")
        );
        assert!(
            error("journal ~ x")
                .message
                .starts_with("the journal cannot")
        );
    }

    #[test]
    fn errors_display_and_render_with_a_caret() {
        let e = error("severity >=");
        assert_eq!(e.to_string(), "column 12: expected a value after \">=\"");
        assert_eq!(
            e.render("severity >="),
            "expected a value after \">=\"\nseverity >=\n           ^"
        );
        let e = error("node\t= \"a");
        assert_eq!(
            e.render("node\t= \"a"),
            "unterminated string\nnode = \"a\n       ^"
        );
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}node = a{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(error(&deep).message.starts_with("too deeply nested"));
        let deep = format!("{}node = a", "not ".repeat(10_000));
        assert!(error(&deep).message.starts_with("too deeply nested"));
        let ok = format!("{}node = a{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert!(Filter::parse(&ok).is_ok());
        let long = vec!["node = a"; 10_000].join(" or ");
        assert!(Filter::parse(&long).is_ok());
    }

    #[test]
    fn sort_specs() {
        let key = |field: &str, descending| SortKey {
            field: field.into(),
            descending,
        };
        assert_eq!(
            parse_sort("-severity,last_occurrence").unwrap(),
            vec![key("severity", true), key("last_occurrence", false)]
        );
        assert_eq!(
            parse_sort(" - Severity , Extra.Site ").unwrap(),
            vec![key("severity", true), key("extra.Site", false)]
        );
        assert_eq!(parse_sort("  ").unwrap(), vec![]);

        let err = |spec: &str| parse_sort(spec).unwrap_err();
        assert_eq!(err("-sevrity").column, 2);
        assert!(
            err("-sevrity")
                .message
                .starts_with("unknown field \"sevrity\"")
        );
        assert_eq!(err("node, journal").column, 7);
        assert_eq!(err("node,,tally").column, 6);
        assert_eq!(err("node,").column, 6);
        assert_eq!(err("node,-").message, "expected a field name after \"-\"");
        assert_eq!(err("node,-").column, 7);
    }

    fn query(filter: &str, sort: &str, limit: Option<u32>) -> Query {
        Query {
            filter: filter.into(),
            sort: parse_sort(sort).unwrap(),
            limit,
        }
    }

    fn serials(alerts: &[Alert]) -> Vec<u64> {
        alerts.iter().map(|a| a.serial).collect()
    }

    fn sample() -> Vec<Alert> {
        vec![
            alert(4, "web1", 3),
            alert(2, "web2", 5),
            alert(7, "db1", 3),
            alert(1, "db2", 0),
            alert(3, "web3", 5),
            alert(6, "web4", 3),
        ]
    }

    #[test]
    fn run_defaults_to_serial_order() {
        let alerts = sample();
        let (got, total) = run(&alerts, &query("", "", None)).unwrap();
        assert_eq!(serials(&got), [1, 2, 3, 4, 6, 7]);
        assert_eq!(total, 6);
    }

    #[test]
    fn run_sorts_stably_in_both_directions() {
        let alerts = sample();
        let (got, _) = run(&alerts, &query("", "severity", None)).unwrap();
        assert_eq!(
            serials(&got),
            [1, 4, 7, 6, 2, 3],
            "ties keep the input order"
        );
        let (got, _) = run(&alerts, &query("", "-severity", None)).unwrap();
        assert_eq!(
            serials(&got),
            [2, 3, 4, 7, 6, 1],
            "ties keep the input order"
        );
        let (got, _) = run(&alerts, &query("", "-severity,-node", None)).unwrap();
        assert_eq!(serials(&got), [3, 2, 6, 4, 7, 1]);
    }

    #[test]
    fn run_limits_and_counts_all_matches() {
        let alerts = sample();
        let (got, total) = run(&alerts, &query("severity >= minor", "-severity", Some(3))).unwrap();
        assert_eq!(serials(&got), [2, 3, 4]);
        assert_eq!(total, 5);
        let (got, total) = run(&alerts, &query("severity = 3", "", Some(0))).unwrap();
        assert!(got.is_empty());
        assert_eq!(total, 3);
        let (got, total) = run(&alerts, &query("node ~ web", "", Some(100))).unwrap();
        assert_eq!(serials(&got), [2, 3, 4, 6]);
        assert_eq!(total, 4);
    }

    #[test]
    fn run_sorts_by_extra_fields() {
        let mut alerts = sample();
        for (a, site) in alerts
            .iter_mut()
            .zip(["fra", "ams", "", "ams", "zrh", "fra"])
        {
            if !site.is_empty() {
                a.extra.insert("site".into(), site.into());
            }
        }
        let (got, _) = run(&alerts, &query("", "extra.site,serial", None)).unwrap();
        assert_eq!(serials(&got), [7, 1, 2, 4, 6, 3]);
    }

    #[test]
    fn run_reports_bad_filters_and_sort_keys() {
        let alerts = sample();
        assert_eq!(
            run(&alerts, &query("tally ~ 1", "", None))
                .unwrap_err()
                .column,
            7
        );
        let q = Query {
            sort: vec![SortKey {
                field: "nope".into(),
                descending: false,
            }],
            ..Query::default()
        };
        let e = run(&alerts, &q).unwrap_err();
        assert_eq!(e.column, 0);
        assert!(
            e.to_string()
                .starts_with("sort key \"nope\": unknown field"),
            "{e}"
        );
        assert_eq!(e.render(""), e.message);
    }

    fn arb_alert() -> impl Strategy<Value = Alert> {
        (
            0u64..8,
            prop::sample::select(vec!["web1", "web2", "db1", ""]),
            0u8..=5,
            prop::sample::select(KINDS.to_vec()),
            any::<bool>(),
            0u64..4,
            -2i64..3,
            prop::option::of(prop::sample::select(vec!["ams", "fra"])),
            prop::sample::select(vec!["disk full", "web down", ""]),
        )
            .prop_map(
                |(
                    serial,
                    node,
                    severity,
                    kind,
                    acknowledged,
                    tally,
                    state_change,
                    site,
                    summary,
                )| {
                    let mut a = Alert {
                        serial,
                        node: node.into(),
                        severity: Severity::new(severity).unwrap(),
                        kind,
                        acknowledged,
                        tally,
                        state_change,
                        summary: summary.into(),
                        ..Alert::default()
                    };
                    if let Some(site) = site {
                        a.extra.insert("site".into(), site.into());
                    }
                    a
                },
            )
    }

    fn arb_comparison() -> impl Strategy<Value = String> {
        let cmp = prop::sample::select(vec!["=", "==", "!=", "<", "<=", ">", ">="]);
        let eq = prop::sample::select(vec!["=", "!="]);
        prop_oneof![
            (
                prop::sample::select(vec!["node", "summary", "extra.site"]),
                prop::sample::select(vec!["=", "!=", "<", ">=", "~"]),
                prop::sample::select(vec!["web1", "\"web\"", "db1", "\"\"", "ams", "down"]),
            )
                .prop_map(|(f, o, v)| format!("{f} {o} {v}")),
            (
                prop::sample::select(vec!["serial", "tally", "state_change"]),
                cmp.clone(),
                -2i64..8,
            )
                .prop_map(|(f, o, v)| format!("{f} {o} {v}")),
            (
                cmp,
                prop::sample::select(vec!["0", "3", "5", "major", "Clear", "\"warning\""]),
            )
                .prop_map(|(o, v)| format!("severity {o} {v}")),
            (
                eq.clone(),
                prop::sample::select(vec!["problem", "resolution", "INFORMATION"]),
            )
                .prop_map(|(o, v)| format!("kind {o} {v}")),
            (eq, any::<bool>()).prop_map(|(o, v)| format!("acknowledged {o} {v}")),
        ]
    }

    fn arb_filter() -> impl Strategy<Value = String> {
        arb_comparison().prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} and {b}")),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a} OR {b}")),
                inner.clone().prop_map(|a| format!("not {a}")),
                inner.prop_map(|a| format!("({a})")),
            ]
        })
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in any::<String>()) {
            let _ = Filter::parse(&text);
            let _ = parse_sort(&text);
        }

        #[test]
        fn parse_never_panics_on_filter_like_text(
            text in "[a-z_. ()=!<>~\"\\\\0-9-]{0,40}",
        ) {
            if let Err(e) = Filter::parse(&text) {
                prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1);
                let _ = e.render(&text);
            }
        }

        #[test]
        fn not_is_the_complement(
            filter in arb_filter(),
            alerts in prop::collection::vec(arb_alert(), 0..16),
        ) {
            let f = Filter::parse(&filter).unwrap();
            let negated = format!("not ({filter})");
            let not_f = Filter::parse(&negated).unwrap();
            for a in &alerts {
                prop_assert_eq!(not_f.matches(a), !f.matches(a), "{:?}", a);
            }
        }

        #[test]
        fn run_is_a_stable_sort_then_a_limit(
            alerts in prop::collection::vec(arb_alert(), 0..24),
            sort in prop::sample::select(vec!["", "severity", "-severity,node", "-tally,extra.site"]),
            limit in prop::option::of(0u32..30),
        ) {
            let q = query("", sort, limit);
            let (got, total) = run(&alerts, &q).unwrap();
            let keys: Vec<SortField> = q
                .sort
                .iter()
                .map(|k| SortField { field: Field::resolve(&k.field, 1).unwrap(), descending: k.descending })
                .collect();
            let mut want: Vec<&Alert> = alerts.iter().collect();
            want.sort_by(|a, b| compare(&keys, a, b));
            want.truncate(limit.map_or(usize::MAX, |l| l as usize));
            prop_assert_eq!(total, alerts.len() as u64);
            prop_assert_eq!(got.iter().collect::<Vec<_>>(), want);
        }
    }
}
