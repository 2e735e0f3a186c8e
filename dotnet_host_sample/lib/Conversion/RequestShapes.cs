// What the dispatcher needs to know about a request before running it:
// whether it blocks (`background: false` waits for the work to finish). The
// distributed form {"type", "request_id", "data"} runs `data`, so it blocks
// when `data` does, as the facade reads it. An object's members are found
// once per type.
using System;
using System.Collections;
using System.Collections.Concurrent;
using System.Reflection;

namespace EmbeddedWorker
{
    internal static class RequestShapes
    {
        sealed class Members
        {
            public PropertyInfo Background, Type, Data;
        }

        static readonly ConcurrentDictionary<Type, Members> Known = new ConcurrentDictionary<Type, Members>();

        public static bool Blocks(object request)
        {
            object background, type, data;
            Read(request, out background, out type, out data);
            if (Equals(background, false)) return true;
            if (!(type is string) || data == null) return false;
            Read(data, out background, out type, out data);
            return Equals(background, false);
        }

        /// <summary>The members the decision reads: keys of a Reply or dictionary, properties of an object.</summary>
        static void Read(object request, out object background, out object type, out object data)
        {
            background = type = data = null;
            if (request == null || request is string || request is ValueType) return;
            var reply = request as Reply;
            if (reply != null)
            {
                reply.Fields.TryGetValue("background", out background);
                reply.Fields.TryGetValue("type", out type);
                reply.Fields.TryGetValue("data", out data);
                return;
            }
            var dictionary = request as IDictionary;
            if (dictionary != null)
            {
                if (dictionary.Contains("background")) background = dictionary["background"];
                if (dictionary.Contains("type")) type = dictionary["type"];
                if (dictionary.Contains("data")) data = dictionary["data"];
                return;
            }
            var members = Known.GetOrAdd(request.GetType(), Find);
            if (members.Background != null) background = members.Background.GetValue(request, null);
            if (members.Type != null) type = members.Type.GetValue(request, null);
            if (members.Data != null) data = members.Data.GetValue(request, null);
        }

        static Members Find(Type type)
        {
            return new Members
            {
                Background = type.GetProperty("background") ?? type.GetProperty("Background"),
                Type = type.GetProperty("type") ?? type.GetProperty("Type"),
                Data = type.GetProperty("data") ?? type.GetProperty("Data"),
            };
        }
    }
}
