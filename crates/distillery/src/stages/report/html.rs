//! report.html: the markdown report rendered as one self-contained page (the plot inline as
//! SVG), so the table, the curves, the samples and the card read together in a browser.
//! The renderer covers exactly the markdown kd-report writes: headings, pipe tables, bullet
//! lists, fenced code, paragraphs, `**bold**`, `` `code` `` and the plot's image line.

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Inline markup of one escaped line: `code` spans first (kept verbatim), then **bold**.
fn inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in escape(s).split('`').enumerate() {
        if i % 2 == 1 {
            out += &format!("<code>{part}</code>");
        } else {
            let mut bold = false;
            for (j, piece) in part.split("**").enumerate() {
                if j > 0 {
                    out += if bold { "</b>" } else { "<b>" };
                    bold = !bold;
                }
                out += piece;
            }
            if bold {
                out += "</b>";
            }
        }
    }
    out
}

fn cells(line: &str) -> Vec<String> {
    let t = line.trim().trim_start_matches('|').trim_end_matches('|');
    // `\|` inside a cell is a literal bar.
    t.replace("\\|", "\u{0}").split('|').map(|c| c.trim().replace('\u{0}', "|")).collect()
}

pub(crate) fn page(title: &str, md: &str, svg: &str) -> String {
    let mut body = String::new();
    let mut lines = md.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("### ") {
            body += &format!("<h3>{}</h3>\n", inline(h));
        } else if let Some(h) = line.strip_prefix("## ") {
            body += &format!("<h2>{}</h2>\n", inline(h));
        } else if let Some(h) = line.strip_prefix("# ") {
            body += &format!("<h1>{}</h1>\n", inline(h));
        } else if line.starts_with("![") {
            body += &format!("<figure id=\"plot\">{}</figure>\n", svg.trim_start_matches(|c| c != '<'));
        } else if line.starts_with("```") {
            body += "<pre>";
            for l in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                body += &escape(l);
                body += "\n";
            }
            body += "</pre>\n";
        } else if line.starts_with('|') {
            body += "<table>\n<thead><tr>";
            body += &cells(line).iter().map(|c| format!("<th>{}</th>", inline(c))).collect::<String>();
            body += "</tr></thead>\n<tbody>\n";
            lines.next_if(|l| l.starts_with("|--") || l.starts_with("|:-") || l.starts_with("|-"));
            while let Some(row) = lines.next_if(|l| l.starts_with('|')) {
                body += "<tr>";
                body += &cells(row).iter().map(|c| format!("<td>{}</td>", inline(c))).collect::<String>();
                body += "</tr>\n";
            }
            body += "</tbody></table>\n";
        } else if let Some(item) = line.strip_prefix("* ") {
            body += &format!("<ul>\n<li>{}</li>\n", inline(item));
            while let Some(next) = lines.next_if(|l| l.starts_with("* ")) {
                body += &format!("<li>{}</li>\n", inline(&next[2..]));
            }
            body += "</ul>\n";
        } else if !line.trim().is_empty() {
            body += &format!("<p>{}</p>\n", inline(line));
        }
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 2em; max-width: 1500px; }}\n\
         table {{ border-collapse: collapse; margin: 1em 0; font-size: 14px; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }}\n\
         thead {{ background: #f0f0f0; }}\n\
         pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}\n\
         figure svg {{ max-width: 100%; height: auto; }}\n\
         </style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    )
}
