// Design notes
// - Whether a JSON request blocks (`"background": false`, at its top level
//   or in the `data` of the distributed form {"type", "request_id", "data"}),
//   read in C# in one pass: the dispatcher must know before the call, and
//   asking Python's json to parse it meant a GIL hold and a parse that the
//   facade then did again.
// - It reads as Python's json reads: any spacing, escapes in keys, the last
//   of duplicate keys. Text that is not JSON does not block: it runs inline
//   and the facade answers it `invalid_request`.
using System;
using System.Text;

namespace EmbeddedWorker
{
    internal static class JsonRequestShape
    {
        public static bool Blocks(string json)
        {
            if (json == null) return false;
            try
            {
                int at = 0;
                bool typed, dataBlocks;
                Skip(json, ref at);
                if (at >= json.Length || json[at] != '{') return false;
                bool blocks = ReadObject(json, ref at, true, out typed, out dataBlocks);
                return blocks || (typed && dataBlocks);
            }
            catch (FormatException)
            {
                return false;
            }
            catch (IndexOutOfRangeException)
            {
                return false;
            }
        }

        /// <summary>An object at `at`: whether its `background` is false; at the top, whether it names a `type` and its `data` blocks.</summary>
        static bool ReadObject(string json, ref int at, bool top, out bool typed, out bool dataBlocks)
        {
            bool blocks = false;
            typed = dataBlocks = false;
            Expect(json, ref at, '{');
            Skip(json, ref at);
            if (json[at] == '}') { at++; return false; }
            while (true)
            {
                Skip(json, ref at);
                var key = ReadString(json, ref at);
                Skip(json, ref at);
                Expect(json, ref at, ':');
                Skip(json, ref at);
                char first = json[at];
                if (key == "background")
                {
                    blocks = first == 'f';
                    if (blocks) Literal(json, ref at, "false");
                    else SkipValue(json, ref at);
                }
                else if (top && key == "type") { typed = first == '"'; SkipValue(json, ref at); }
                else if (top && key == "data" && first == '{')
                {
                    bool unusedTyped, unusedData;
                    dataBlocks = ReadObject(json, ref at, false, out unusedTyped, out unusedData);
                }
                else
                {
                    if (top && key == "data") dataBlocks = false;
                    SkipValue(json, ref at);
                }
                Skip(json, ref at);
                if (json[at] == ',') { at++; continue; }
                Expect(json, ref at, '}');
                return blocks;
            }
        }

        static void Literal(string json, ref int at, string word)
        {
            if (string.CompareOrdinal(json, at, word, 0, word.Length) != 0) throw new FormatException();
            at += word.Length;
        }

        static void SkipValue(string json, ref int at)
        {
            char c = json[at];
            if (c == '"') { ReadString(json, ref at); return; }
            if (c == '{' || c == '[')
            {
                char close = c == '{' ? '}' : ']';
                at++;
                Skip(json, ref at);
                if (json[at] == close) { at++; return; }
                while (true)
                {
                    Skip(json, ref at);
                    if (c == '{')
                    {
                        ReadString(json, ref at);
                        Skip(json, ref at);
                        Expect(json, ref at, ':');
                        Skip(json, ref at);
                    }
                    SkipValue(json, ref at);
                    Skip(json, ref at);
                    if (json[at] == ',') { at++; continue; }
                    Expect(json, ref at, close);
                    return;
                }
            }
            int start = at;  // a number, true, false, null, NaN, Infinity
            while (at < json.Length && ",}] \t\r\n".IndexOf(json[at]) < 0) at++;
            if (at == start) throw new FormatException();
        }

        static string ReadString(string json, ref int at)
        {
            Expect(json, ref at, '"');
            var text = new StringBuilder();
            while (true)
            {
                char c = json[at++];
                if (c == '"') return text.ToString();
                if (c != '\\') { text.Append(c); continue; }
                char escape = json[at++];
                switch (escape)
                {
                    case 'u': text.Append((char)Convert.ToInt32(json.Substring(at, 4), 16)); at += 4; break;
                    case 'n': text.Append('\n'); break;
                    case 't': text.Append('\t'); break;
                    case 'r': text.Append('\r'); break;
                    case 'b': text.Append('\b'); break;
                    case 'f': text.Append('\f'); break;
                    default: text.Append(escape); break;
                }
            }
        }

        static void Expect(string json, ref int at, char c)
        {
            if (json[at] != c) throw new FormatException();
            at++;
        }

        static void Skip(string json, ref int at)
        {
            while (at < json.Length && (json[at] == ' ' || json[at] == '\t' || json[at] == '\r' || json[at] == '\n')) at++;
        }
    }
}
