// Renders Ollama Modelfile TEMPLATEs with Go's text/template the way Ollama's template.Execute does for a
// template that uses .Messages: System = the system turns joined by a blank line, Messages = the turns with
// consecutive ones of a role joined by a blank line. Input on stdin: a JSON list of {template, messages}; output:
// a JSON list of rendered strings (or "ERROR: ..." per case). Used by benchmarks/check_modelfile_go.py.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var out []string
	for _, c := range cases {
		t, err := template.New("").Parse(c.Template)
		if err != nil {
			out = append(out, "ERROR: "+err.Error())
			continue
		}
		system, messages := collate(c.Messages)
		var b bytes.Buffer
		err = t.Execute(&b, map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": ""})
		if err != nil {
			out = append(out, "ERROR: "+err.Error())
			continue
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
