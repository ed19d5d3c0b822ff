//! Operator queries: filter expressions, sort keys and limits over alerts.
