# python3 box_rules_check.py CLAUDE_START_SH HOSTS_JSON: runs the box program embedded in
# claude_start.sh and prints, as JSON, whether it found the proxy's rules, the Ollama URL it reads
# from each OLLAMA_HOST value, and two answers of its installed().
import json, re, sys
source = re.search(r"^BOX_PY=\$\(cat <<'PY'\n(.*?)^PY\n", open(sys.argv[1]).read(), re.S | re.M).group(1)
box = {"__name__": "box", "BOX_SOURCE": source}
exec(compile(source, "box.py", "exec"), box)
urls = [box["ollama_url"]({"OLLAMA_HOST": value}) for value in json.loads(sys.argv[2])]
print(json.dumps({"from_proxy": box["proxy_rules"]() is not None, "urls": urls,
                  "installed": [box["installed"]("llama3.2", ["llama3.2:latest"]),
                                box["installed"]("llama3.2", ["llama3.2:3b"])]}))
