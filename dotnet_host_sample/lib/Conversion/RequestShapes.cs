// What the dispatcher needs to know about a request before running it:
// whether it blocks (`background: false` waits for the work to finish), read
// through an accessor cached per type.
using System;
using System.Collections;
using System.Collections.Concurrent;
using System.Reflection;

namespace EmbeddedWorker
{
    internal static class RequestShapes
    {
        static readonly ConcurrentDictionary<Type, PropertyInfo> Background = new ConcurrentDictionary<Type, PropertyInfo>();

        public static bool Blocks(object request)
        {
            if (request == null || request is string || request is ValueType) return false;
            var reply = request as Reply;
            if (reply != null) return Equals(reply["background"], false);
            var dictionary = request as IDictionary;
            if (dictionary != null) return dictionary.Contains("background") && Equals(dictionary["background"], false);
            var property = Background.GetOrAdd(request.GetType(), type =>
                type.GetProperty("background") ?? type.GetProperty("Background"));
            return property != null && Equals(property.GetValue(request, null), false);
        }
    }
}
